"""HC-RLHF: Hoeffding cost bound, the pessimistic training bound and the held-out safety test that refuses a policy."""

import math

import pytest

from alignflow.algorithms.hc_safety import SafetyTestFailed, hoeffding_upper_bound, pessimistic_cost_bound, safety_test


def test_bounds_by_hand():
    """Costs (0, 1, 0, 1) in [0, 1], delta 0.05: mean 0.5, width sqrt(ln 20 / 8) = 0.61194 -> U = 1.11194.
    Pessimistic bound with n_safety = 16: 0.5 + 2 sqrt(ln 20 / 32) = 0.5 + 0.61194 = 1.11194 too (the doubled
    width at 4x the rows); range [-1, 1] doubles the width."""
    costs = [0.0, 1.0, 0.0, 1.0]
    width = math.sqrt(math.log(20.0) / 8)
    assert width == pytest.approx(0.611937, abs=1e-6)
    assert hoeffding_upper_bound(costs, 0.05, (0.0, 1.0)) == pytest.approx(0.5 + width)
    assert pessimistic_cost_bound(costs, 0.05, (0.0, 1.0), n_safety=16) == pytest.approx(0.5 + width)
    assert hoeffding_upper_bound(costs, 0.05, (-1.0, 1.0)) == pytest.approx(0.5 + 2 * width)


def test_safety_test_refuses_a_policy_whose_cost_bound_is_violated():
    """400 held-out costs, 10% unsafe (cost 1), threshold 0.15, delta 0.05: U = 0.1 + sqrt(ln 20 / 800)
    = 0.1 + 0.0612 = 0.1612 > 0.15 -> refused although the mean (0.10) meets the threshold; 5% unsafe:
    U = 0.05 + 0.0612 = 0.1112 <= 0.15 -> passes."""
    risky = [1.0] * 40 + [0.0] * 360
    result = safety_test(risky, 0.15, 0.05, (0.0, 1.0))
    assert not result.passed and result.mean == pytest.approx(0.1)
    assert result.bound == pytest.approx(0.1 + math.sqrt(math.log(20.0) / 800))
    with pytest.raises(SafetyTestFailed, match=r"upper bound of the expected cost is 0.1612 > threshold 0.15"):
        safety_test(risky, 0.15, 0.05, (0.0, 1.0), raise_on_fail=True)
    assert safety_test([1.0] * 20 + [0.0] * 380, 0.15, 0.05, (0.0, 1.0), raise_on_fail=True).passed


@pytest.mark.parametrize(
    "costs, delta, rng, message",
    [
        ([], 0.05, (0, 1), "no costs"),
        ([0.5], 1.0, (0, 1), "delta"),
        ([2.0], 0.05, (0, 1), r"cost 2.0 \(row 0\)"),
        ([0.5], 0.05, (1, 0), "low < high"),
    ],
)
def test_bad_inputs_are_errors(costs, delta, rng, message):
    with pytest.raises(ValueError, match=message):
        hoeffding_upper_bound(costs, delta, rng)
