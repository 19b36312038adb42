"""HC-RLHF in ``alignflow rl`` (docs/hc_rlhf.md): the Lagrange multiplier of a Safe RLHF run, optionally held to
the pessimistic cost bound, and the held-out high-confidence safety test that decides whether the final policy
is saved as ``<output_dir>/model``.

The safety set is the last ``cost.safety_test.held_out`` rows of the eval split (never trained on). At the end
of the run one response per safety prompt is sampled from the final policy (the rollout's temperature), its
episode cost scored by the cost sources, clipped into ``cost.safety_test.cost_range``, and
:func:`~alignflow.algorithms.hc_safety.safety_test` bounds the expected cost with probability ``1 − delta``. A
violated bound refuses the policy: one error line, ``safety_test.json`` in the run directory, no ``model/``;
the checkpoints under ``checkpoints/`` stay.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from alignflow.algorithms.hc_safety import PessimisticLagrange, safety_test
from alignflow.algorithms.safe import LagrangeMultiplier
from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig

log = logging.getLogger("alignflow.rl")


def make_lagrange(cfg: RLConfig) -> LagrangeMultiplier:
    """Safe RLHF's multiplier; with ``cost.safety_test.pessimistic`` the HC-RLHF pessimistic one."""
    c, t = cfg.cost, cfg.cost.safety_test
    if not t.pessimistic:
        return LagrangeMultiplier(c.lambda_init, c.lambda_lr, c.lambda_max, c.threshold, c.window)
    low, high = check_safety_test(cfg)
    return PessimisticLagrange(
        c.lambda_init, c.lambda_lr, c.lambda_max, c.threshold, c.window, t.delta, (low, high), t.held_out
    )


def check_safety_test(cfg: RLConfig) -> tuple[float, float]:
    """The keys of ``cost.safety_test`` (ConfigError names them); returns the cost range."""
    t = cfg.cost.safety_test
    rng = t.cost_range
    if not (isinstance(rng, (list, tuple)) and len(rng) == 2 and float(rng[0]) < float(rng[1])):
        raise ConfigError(f"cost.safety_test.cost_range: {rng!r} must be [low, high] with low < high, e.g. [0, 4]")
    if (t.held_out or t.pessimistic) and not (cfg.cost.task or cfg.cost.functions or cfg.cost.models):
        raise ConfigError(
            "cost.safety_test needs cost sources (cost.task, cost.functions or cost.models) of a Safe RLHF run "
            "(algo.name=safe_ppo)"
        )
    if t.pessimistic and t.held_out < 1:
        raise ConfigError("cost.safety_test.pessimistic uses the safety set's size: set cost.safety_test.held_out >= 1")
    return float(rng[0]), float(rng[1])


def safety_rows(cfg: RLConfig, eval_rows: list) -> list:
    """The safety set: the last ``held_out`` rows of the eval split (checked when the run starts; [] without a
    test)."""
    n = cfg.cost.safety_test.held_out
    if not n:
        return []
    if n > len(eval_rows):
        raise ConfigError(
            f"cost.safety_test.held_out={n} but the eval split has {len(eval_rows)} rows (data.eval_path or "
            "data.eval_fraction); use a smaller held_out or more eval rows"
        )
    return eval_rows[len(eval_rows) - n :]


def safety_gate(roles, prompts: Batch, cfg: RLConfig, out: Path) -> dict:
    """Run the held-out test on the final policy; returns its ``safety/*`` metrics (``safety/passed`` 1 or 0) and
    writes ``<out>/safety_test.json``. The caller saves the policy only when it passed."""
    low, high = check_safety_test(cfg)
    t = cfg.cost.safety_test
    batch = roles.rollout.generate(prompts)
    batch = batch.select(list(range(0, len(batch), cfg.rollout.n)))  # one response per safety prompt
    costs = roles.cost.score(batch)["costs"].float()
    clipped = int(((costs < low) | (costs > high)).sum())
    result = safety_test(costs.clamp(low, high).tolist(), t.threshold, t.delta, (low, high))
    (out / "safety_test.json").write_text(json.dumps(dataclasses.asdict(result) | {"clipped": clipped}, indent=1))
    m = {
        "safety/passed": float(result.passed),
        "safety/bound": result.bound,
        "safety/cost_mean": result.mean,
        "safety/clipped": float(clipped),
    }
    if not result.passed:
        log.error(
            "high-confidence safety test failed: the %.0f%% upper bound of the expected cost is %.4f > "
            "cost.safety_test.threshold %s (mean %.4f over %d held-out prompts); the policy is NOT saved as %s "
            "(checkpoints stay in %s)",
            100 * (1 - t.delta),
            result.bound,
            t.threshold,
            result.mean,
            result.n,
            out / "model",
            out / "checkpoints",
        )
    return m
