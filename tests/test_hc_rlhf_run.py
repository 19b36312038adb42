"""HC-RLHF wired into `alignflow rl`: the pessimistic Lagrange update by hand, the cost.safety_test keys, and a
Safe RLHF run whose final policy the held-out safety test refuses (bound violated) or saves (bound met)."""

from __future__ import annotations

import json
import math

import pytest

from alignflow.algorithms.hc_safety import PessimisticLagrange
from alignflow.algorithms.safe import LagrangeMultiplier
from alignflow.config import ConfigError
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rl_algos import resolve
from tests.test_online_rl import rl_cfg


def test_pessimistic_lagrange_by_hand():
    """delta = e^-2 (ln 1/delta = 2), cost range (0, 1), n_safety 4: width = sqrt(2 / 8) = 0.5, bound = mean + 2 * 0.5.
    Costs (0, 1, 0, 1): mean 0.5, bound 1.5; threshold 0.1, lr 0.1, lambda 1: log lambda = 0.1 * 1.4 = 0.14,
    lambda = e^0.14 = 1.1503; the plain multiplier steps on the mean: 0.1 * 0.4 = 0.04, e^0.04 = 1.0408.
    Costs outside the range are clipped into it: (2, -1) count as (1, 0)."""
    pess = PessimisticLagrange(1.0, 0.1, 5.0, 0.1, 4, math.exp(-2), (0.0, 1.0), 4)
    assert pess.update([0.0, 1.0, 0.0, 1.0]) == pytest.approx(math.exp(0.14))
    assert pess.bound == pytest.approx(1.5)
    assert LagrangeMultiplier(1.0, 0.1, 5.0, 0.1, 4).update([0.0, 1.0, 0.0, 1.0]) == pytest.approx(math.exp(0.04))
    clipped = PessimisticLagrange(1.0, 0.1, 5.0, 0.1, 4, math.exp(-2), (0.0, 1.0), 4)
    clipped.update([2.0, -1.0, 0.0, 1.0])
    assert clipped.bound == pytest.approx(1.5)


def _cfg(task, sft, out, **test):
    return rl_cfg(
        task,
        out,
        sft,
        algo={"name": "safe_ppo"},
        data={"path": str(task.prompts_path), "eval_path": str(task.eval_prompts_path)},
        cost={"task": {"ungrammatical": 1.0}, "threshold": 0.1, "safety_test": test},
        rollout={"prompts_per_step": 4, "n": 1, "max_new_tokens": 12, "eval_prompts": 0},
        train={"batch_size": 4, "max_steps": 2},
    )


def test_safety_test_keys(reviews_task, tmp_path):
    with pytest.raises(ConfigError, match="cost_range"):
        resolve(_cfg(reviews_task, None, tmp_path, held_out=8, cost_range=[2.0, 1.0]))
    with pytest.raises(ConfigError, match="held_out >= 1"):
        resolve(_cfg(reviews_task, None, tmp_path, pessimistic=True))
    with pytest.raises(ConfigError, match="cost sources"):
        resolve(rl_cfg(reviews_task, tmp_path, cost={"safety_test": {"held_out": 8}}))
    with pytest.raises(ConfigError, match="held_out=100000"):
        train_rl(_cfg(reviews_task, None, tmp_path / "big", held_out=100_000))


def test_violated_bound_refuses_the_policy(reviews_task, reviews_sft, tmp_path, caplog):
    """32 held-out prompts, costs clipped into [0, 2], delta 0.1: the Hoeffding width alone is
    2 * sqrt(ln 10 / 64) = 0.379 > threshold 0, so the bound is violated whatever the costs: no model/, the
    checkpoints stay, safety_test.json and the metrics say why. The pessimistic Lagrange update is on."""
    out = tmp_path / "refused"
    cfg = _cfg(reviews_task, reviews_sft, out, held_out=32, delta=0.1, threshold=0.0, cost_range=[0, 2])
    cfg.cost.safety_test.pessimistic = True
    result = train_rl(cfg)
    assert result.eval["safety/passed"] == 0.0 and result.eval["safety/bound"] >= 0.379
    assert not (out / "model").exists() and any((out / "checkpoints").iterdir())
    saved = json.loads((out / "safety_test.json").read_text())
    assert saved["passed"] is False and saved["n"] == 32
    assert "safety test failed" in caplog.text and "NOT saved" in caplog.text


def test_met_bound_saves_the_policy(reviews_task, reviews_sft, tmp_path):
    """Same run with threshold 2.5: the bound is at most 2 + 0.379 = 2.379 <= 2.5, so the policy is saved."""
    out = tmp_path / "saved"
    result = train_rl(_cfg(reviews_task, reviews_sft, out, held_out=32, delta=0.1, threshold=2.5, cost_range=[0, 2]))
    assert result.eval["safety/passed"] == 1.0
    assert (out / "model" / "config.json").exists()
