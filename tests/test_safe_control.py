"""SAFE's control pieces: soft-min double critic, entropy-gated KL coefficient, PID-controlled threshold."""

import math

import pytest
import torch

from alignflow.algorithms.safe_control import PIDController, entropy_gated_kl_coef, soft_min


def test_soft_min_by_hand():
    """tau = 1, V1 = 0, V2 = ln 3: -log((1 + 1/3) / 2) = log 1.5 = 0.4055, between min 0 and mean 0.549;
    equal critics give their value; tau -> 0 gives the minimum."""
    v1, v2 = torch.tensor([0.0, 2.0, 5.0]), torch.tensor([math.log(3.0), 2.0, -1.0])
    out = soft_min(v1, v2, 1.0)
    assert out[0].item() == pytest.approx(math.log(1.5), abs=1e-6)
    assert out[1].item() == pytest.approx(2.0, abs=1e-6)
    assert torch.allclose(soft_min(v1, v2, 1e-3), torch.minimum(v1, v2), atol=1e-2)
    assert bool((out >= torch.minimum(v1, v2) - 1e-6).all() and (out <= (v1 + v2) / 2 + 1e-6).all())
    with pytest.raises(ValueError, match="tau"):
        soft_min(v1, v2, 0.0)


def test_entropy_gate_by_hand():
    """beta 0.1, target 2, width 0.5: H = 2 -> 0.05; H = 2 - 0.5 ln 3 -> 0.1 * 1 / (1 + 1/3) = 0.075;
    H far above the target -> ~0. width 0 is a step."""
    assert entropy_gated_kl_coef(0.1, 2.0, 2.0, 0.5) == pytest.approx(0.05)
    assert entropy_gated_kl_coef(0.1, 2.0 - 0.5 * math.log(3.0), 2.0, 0.5) == pytest.approx(0.075)
    assert entropy_gated_kl_coef(0.1, 10.0, 2.0, 0.5) < 1e-7
    assert [entropy_gated_kl_coef(0.1, h, 2.0, 0.0) for h in (1.0, 2.0, 3.0)] == [0.1, 0.05, 0.0]
    with pytest.raises(ValueError, match="non-finite"):
        entropy_gated_kl_coef(0.1, float("nan"), 2.0, 0.5)


def test_pid_by_hand():
    """target 1, kp 1, ki 0.5, kd 0.25, base 0.1: measured 3 -> e 2, I 2, D 0: 0.1 + 2 + 1 = 3.1;
    measured 2 -> e 1, I 3, D -1: 0.1 + 1 + 1.5 - 0.25 = 2.35; high 2.5 clamps the first to 2.5;
    integral_limit 2.5 makes the second 0.1 + 1 + 1.25 - 0.25 = 2.1."""
    pid = PIDController(1.0, 1.0, 0.5, 0.25, base=0.1)
    assert pid.update(3.0) == pytest.approx(3.1) and pid.update(2.0) == pytest.approx(2.35)
    clamped = PIDController(1.0, 1.0, 0.5, 0.25, base=0.1, low=0.0, high=2.5, integral_limit=2.5)
    assert clamped.update(3.0) == pytest.approx(2.5) and clamped.update(2.0) == pytest.approx(2.1)
    restored = PIDController(1.0, 1.0, 0.5, 0.25, base=0.1)
    restored.load_state_dict(pid.state_dict())
    assert restored.update(1.0) == pid.update(1.0)
