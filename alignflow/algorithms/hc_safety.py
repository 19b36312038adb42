"""HC-RLHF (RLHF with high-confidence safety constraints): a pessimistic cost bound during training and a held-out
safety test before a policy is returned, as pure functions (docs/hc_rlhf.md).

With episode costs ``c_1 .. c_n`` in a known range ``[a, b]`` (cost > 0 = unsafe, as in Safe RLHF), Hoeffding's
inequality gives the one-sided upper confidence bound that holds with probability at least ``1 - delta``::

    U(c, delta) = mean(c) + (b - a) * sqrt(ln(1 / delta) / (2 n))

* **Safety test** (:func:`safety_test`): on held-out costs of the candidate policy, the policy passes only if
  ``U(c_safety, delta) <= threshold``; otherwise it is refused (:class:`SafetyTestFailed`).
* **Pessimistic bound during training** (:func:`pessimistic_cost_bound`): the candidate is trained against the
  bound it will meet in the test, inflated as in Seldonian candidate selection: the confidence term is doubled
  and computed with the SAFETY set's size ``n_safety``, so a candidate that only just meets the constraint on
  its training data is not proposed: ``mean(c) + 2 (b - a) sqrt(ln(1 / delta) / (2 n_safety))``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from alignflow.algorithms.safe import LagrangeMultiplier

Tensor = torch.Tensor


class SafetyTestFailed(RuntimeError):
    """The held-out high-confidence safety test refused the policy; the message gives the bound and threshold."""


@dataclasses.dataclass(frozen=True)
class SafetyResult:
    passed: bool
    bound: float  # the (1 - delta) upper confidence bound of the expected cost
    mean: float
    n: int
    threshold: float
    delta: float


def _check(costs: Sequence[float], delta: float, cost_range: tuple[float, float]) -> list[float]:
    values = [float(c) for c in costs]
    if not values:
        raise ValueError("HC-RLHF cost bound: no costs given")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"HC-RLHF: delta must lie in (0, 1), got {delta}")
    a, b = cost_range
    if not a < b:
        raise ValueError(f"HC-RLHF: cost_range must be (low, high) with low < high, got {cost_range}")
    bad = next((i for i, c in enumerate(values) if not a <= c <= b), None)
    if bad is not None:
        raise ValueError(
            f"HC-RLHF: cost {values[bad]} (row {bad}) lies outside cost_range {cost_range}; Hoeffding's "
            "bound needs costs in a known range (clip them, or widen the range)"
        )
    return values


def hoeffding_upper_bound(costs: Sequence[float], delta: float, cost_range: tuple[float, float]) -> float:
    """``mean + (b - a) sqrt(ln(1 / delta) / (2 n))``: holds for the expected cost with probability >= 1 - delta."""
    values = _check(costs, delta, cost_range)
    n = len(values)
    return sum(values) / n + (cost_range[1] - cost_range[0]) * math.sqrt(math.log(1.0 / delta) / (2 * n))


def pessimistic_cost_bound(
    costs: Sequence[float], delta: float, cost_range: tuple[float, float], n_safety: int
) -> float:
    """Training-time bound: ``mean + 2 (b - a) sqrt(ln(1 / delta) / (2 n_safety))`` (Seldonian inflation)."""
    values = _check(costs, delta, cost_range)
    if n_safety < 1:
        raise ValueError(f"HC-RLHF: n_safety (held-out safety rows) must be >= 1, got {n_safety}")
    width = (cost_range[1] - cost_range[0]) * math.sqrt(math.log(1.0 / delta) / (2 * n_safety))
    return sum(values) / len(values) + 2.0 * width


def safety_test(
    costs: Sequence[float], threshold: float, delta: float, cost_range: tuple[float, float], raise_on_fail: bool = False
) -> SafetyResult:
    """The held-out test: pass iff the (1 - delta) upper bound of the expected cost is <= ``threshold``.
    ``raise_on_fail``: a refused policy raises :class:`SafetyTestFailed` instead of returning ``passed=False``."""
    bound = hoeffding_upper_bound(costs, delta, cost_range)
    n = len(costs)
    result = SafetyResult(bound <= threshold, bound, sum(float(c) for c in costs) / n, n, float(threshold), delta)
    if raise_on_fail and not result.passed:
        raise SafetyTestFailed(
            f"high-confidence safety test failed: the {1 - delta:.0%} upper bound of the expected "
            f"cost is {bound:.4f} > threshold {threshold} (mean {result.mean:.4f} over {n} "
            "held-out prompts); the policy is not returned"
        )
    return result


class PessimisticLagrange(LagrangeMultiplier):
    """Safe RLHF's multiplier held to HC-RLHF's pessimistic constraint: each update steps on
    ``U_cand − d`` with ``U_cand`` = :func:`pessimistic_cost_bound` of the window's episode costs (clipped into
    ``cost_range``) instead of their mean, so λ keeps growing until the candidate would also pass the held-out
    test of ``n_safety`` rows: ``log λ ← log λ + lr·(U_cand − d)·λ``."""

    def __init__(
        self,
        init: float,
        lr: float,
        max_value: float | None,
        threshold: float,
        window: int,
        delta: float,
        cost_range: tuple[float, float],
        n_safety: int,
    ):
        super().__init__(init, lr, max_value, threshold, window)
        self.delta, self.cost_range, self.n_safety = delta, (float(cost_range[0]), float(cost_range[1])), n_safety
        self.bound = 0.0

    def update(self, episode_costs: Tensor | Sequence[float]) -> float:
        values = (
            episode_costs.detach().flatten().tolist()
            if isinstance(episode_costs, Tensor)
            else [float(c) for c in episode_costs]
        )
        if not values or any(not math.isfinite(c) for c in values):
            raise ValueError(f"PessimisticLagrange.update needs finite episode costs, got {values[:10]}")
        a, b = self.cost_range
        self.costs.extend(min(max(c, a), b) for c in values)
        self.bound = pessimistic_cost_bound(list(self.costs), self.delta, self.cost_range, self.n_safety)
        self.log_lambda += self.lr * (self.bound - self.threshold) * self.value
        if self.log_max is not None:
            self.log_lambda = min(self.log_lambda, self.log_max)
        return self.value
