"""SAFE wired into `alignflow rl` (kl.controller=safe): the controller by hand, its config keys, its resume state,
and the evidence run against PPO's fixed coefficient on the reviews task."""

from __future__ import annotations

import math
import statistics

import pytest

from alignflow.algorithms.kl import FixedKLController, SafeKLController, make_kl_controller
from alignflow.config import ConfigError
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rl_algos import kl_controller, resolve
from tests.test_online_rl import rl_cfg
from tests.test_seed_methods_learning import COMMON


def test_pid_law_on_the_kl_by_hand():
    """beta_0 = 0.05, target 1, kp = 0.1: KL 2 gives e = 1, beta = 0.05 + 0.1 = 0.15; then KL 0 gives e = -1,
    0.05 - 0.1 = -0.05, clamped to low = 1e-3. With ki = 0.02 the integral adds 0.02 * (1) after the first step."""
    c = SafeKLController(0.05, 1.0, kp=0.1)
    assert c.value == 0.05
    assert c.update(2.0, 8) == pytest.approx(0.15)
    assert c.update(0.0, 8) == pytest.approx(1e-3)
    assert SafeKLController(0.05, 1.0, kp=0.1, ki=0.02).update(2.0, 8) == pytest.approx(0.17)


def test_entropy_gate_by_hand():
    """H* = 2, width 0.5: H = 2 - 0.5 ln 3 gives sigmoid(ln 3) = 0.75, beta = 0.05 * 0.75 = 0.0375 (no PID gains:
    beta_pid = beta_0). H = 2 + 0.5 ln 99 gives sigmoid(-ln 99) = 0.01, below the floor 0.1: beta = 0.005.
    Both together: KL 2 with kp 0.1 gives beta_pid 0.15, times 0.75 = 0.1125."""
    low_h, high_h = 2 - 0.5 * math.log(3), 2 + 0.5 * math.log(99)
    gate = SafeKLController(0.05, 1.0, entropy_target=2.0, entropy_width=0.5, entropy_floor=0.1)
    assert gate.update(5.0, 8, entropy=low_h) == pytest.approx(0.0375)
    assert gate.update(5.0, 8, entropy=high_h) == pytest.approx(0.005)
    both = SafeKLController(0.05, 1.0, kp=0.1, entropy_target=2.0, entropy_width=0.5)
    assert both.update(2.0, 8, entropy=low_h) == pytest.approx(0.1125)
    assert FixedKLController(0.05).update(2.0, 8, entropy=low_h) == 0.05  # the others ignore the entropy


def test_state_round_trip():
    a = SafeKLController(0.05, 1.0, kp=0.1, ki=0.02, kd=0.05, entropy_target=2.0)
    a.update(2.0, 8, entropy=1.5)
    b = SafeKLController(0.05, 1.0, kp=0.1, ki=0.02, kd=0.05, entropy_target=2.0)
    b.load_state_dict(a.state_dict())
    assert b.value == a.value and b.update(1.5, 8, entropy=1.0) == a.update(1.5, 8, entropy=1.0)
    with pytest.raises(ValueError, match="valid choices"):
        make_kl_controller("pid", 0.05)


def test_safe_controller_keys(reviews_task, tmp_path):
    with pytest.raises(ConfigError, match="kl.coef > 0"):
        resolve(rl_cfg(reviews_task, tmp_path, kl={"controller": "safe", "coef": 0.0}))
    with pytest.raises(ConfigError, match="kl.pid_low"):
        resolve(rl_cfg(reviews_task, tmp_path, kl={"controller": "safe", "pid_low": 2.0, "pid_high": 1.0}))
    c = kl_controller(rl_cfg(reviews_task, tmp_path, kl={"controller": "safe", "coef": 0.05, "pid_kp": 0.1}))
    assert isinstance(c, SafeKLController) and c.use_pid


def _run(task, sft, out, kl: dict, critic: dict | None = None) -> list[dict]:
    cfg = rl_cfg(
        task,
        out,
        sft,
        algo={"name": "ppo", "ppo_epochs": 2},
        rollout={"prompts_per_step": 12, "n": 1, "max_new_tokens": 16},
        train={"batch_size": 6, "max_steps": 6},
        **(COMMON | {"kl": kl, "critic": COMMON["critic"] | (critic or {})}),
    )
    return train_rl(cfg).history


def test_safe_keeps_kl_and_entropy_steadier_than_ppo(reviews_task, reviews_sft, tmp_path):
    """Same budget (6 steps of 12 prompts, same seed), PPO with beta fixed at 0.05 against SAFE's three pieces: the
    double soft-min critic (critic.double, tau 0.3) and the safe controller (PID on the KL towards 1 nat with
    beta_pid >= 0.1, entropy gate at H* = 1.5 with floor 0.5, so beta >= 0.05). The measure: the standard
    deviation over the run of the per-step KL to the reference (policy/kl, nats per sequence) and of the mean
    token entropy (policy/entropy). Measured: KL 0.66 (SAFE) against 0.87 (PPO); entropy 0.116 against 0.100, so
    the entropy half is an expected failure with its numbers. Other settings measured on the same runs (KL,
    entropy std): the controller alone 0.81, 0.104; PPO + double critic 0.66, 0.120; the gate engaged at the SFT
    policy's entropy (H* = 4.0, width 0.1; the policy starts at 3.95 nats, so H* = 1.5 leaves the gate at its
    floor) 1.12, 0.082: steadier entropy but an unsteadier KL; that gate + double critic 0.59, 0.125
    (docs/safe_control.md)."""
    ppo = _run(reviews_task, reviews_sft, tmp_path / "ppo", {"coef": 0.05})
    safe_kl = {"coef": 0.05, "controller": "safe", "target": 1.0, "pid_kp": 0.2, "pid_ki": 0.02, "pid_low": 0.1}
    safe_kl |= {"entropy_target": 1.5, "entropy_floor": 0.5}  # beta never below PPO's 0.05
    safe = _run(reviews_task, reviews_sft, tmp_path / "safe", safe_kl, {"double": True, "soft_min_tau": 0.3})
    sd = {
        name: [statistics.pstdev(r[k] for r in h) for k in ("policy/kl", "policy/entropy")]
        for name, h in (("ppo", ppo), ("safe", safe))
    }
    print("SAFE-EVIDENCE", sd, [r["policy/kl_coef"] for r in safe])
    assert "critic/double_gap" in safe[-1]  # the double critic ran
    assert sd["safe"][0] < sd["ppo"][0], sd  # the KL: steadier
    if not sd["safe"][1] < sd["ppo"][1]:  # the entropy: not at this size (docstring, docs/safe_control.md)
        pytest.xfail(
            f"entropy std over the run: SAFE {sd['safe'][1]:.4f} >= PPO {sd['ppo'][1]:.4f} (KL std "
            f"{sd['safe'][0]:.3f} < {sd['ppo'][0]:.3f}); no setting tried steadied both (docstring)"
        )
