"""SAFE's control pieces (entropy-aware predictive control for stable RLHF) as pure functions.

Three pieces, each usable on its own; the online-RL loop does not read them yet (docs/safe_control.md):

* :func:`soft_min` -- a double critic's pessimistic value, a smooth minimum of two critics' values
  ``V = -tau * log((exp(-V1 / tau) + exp(-V2 / tau)) / 2)``: ``min(V1, V2) <= V <= (V1 + V2) / 2``,
  ``V -> min`` as ``tau -> 0`` and ``V = V1`` when the critics agree.
* :func:`entropy_gated_kl_coef` -- the KL coefficient switched on as the policy's entropy falls below a target:
  ``beta_eff = beta * sigmoid((H_target - H) / width)`` (``width = 0``: a hard step).
* :class:`PIDController` -- a threshold (e.g. the KL coefficient or a KL budget) driven by a PID law on the error
  ``e_t = measured_t - target``: ``u_t = kp * e_t + ki * sum_{s<=t} e_s + kd * (e_t - e_{t-1})``, output
  ``clamp(base + u_t, low, high)``, the integral clamped to ``+-integral_limit`` (anti-windup).
"""

from __future__ import annotations

import math
from typing import Any

import torch

Tensor = torch.Tensor


def soft_min(v1: Tensor, v2: Tensor, tau: float) -> Tensor:
    """Smooth minimum of two critics' values (same shape), ``-tau * log(mean(exp(-v / tau)))``; tau > 0."""
    if tau <= 0:
        raise ValueError(f"soft_min temperature tau must be > 0, got {tau}")
    if v1.shape != v2.shape:
        raise ValueError(f"soft_min: the critics' values differ in shape: {tuple(v1.shape)} vs {tuple(v2.shape)}")
    stacked = torch.stack([-v1 / tau, -v2 / tau])  # (2, ...)
    return -tau * (torch.logsumexp(stacked, 0) - math.log(2.0))


def entropy_gated_kl_coef(beta: float, entropy: float | Tensor, target: float, width: float) -> float:
    """``beta * sigmoid((target - entropy) / width)``; ``width = 0`` gives ``beta`` below the target, 0 above
    (``beta / 2`` exactly at it). ``entropy``: the batch's mean token entropy (nats)."""
    if beta < 0 or width < 0:
        raise ValueError(f"entropy_gated_kl_coef needs beta >= 0 and width >= 0, got beta={beta}, width={width}")
    h = float(entropy)
    if not math.isfinite(h):
        raise ValueError(f"entropy_gated_kl_coef got a non-finite entropy {h}")
    if width == 0:
        return beta if h < target else (beta / 2 if h == target else 0.0)
    return beta / (1.0 + math.exp(-(target - h) / width))


class PIDController:
    """``value = clamp(base + kp * e + ki * sum(e) + kd * (e - e_prev), low, high)`` with ``e = measured - target``.

    The first update has no previous error, so its derivative term is 0. The integral is kept within
    ``+-integral_limit`` (None: unbounded). ``value`` before any update is ``clamp(base, low, high)``.
    """

    def __init__(
        self,
        target: float,
        kp: float,
        ki: float = 0.0,
        kd: float = 0.0,
        base: float = 0.0,
        low: float | None = None,
        high: float | None = None,
        integral_limit: float | None = None,
    ):
        if low is not None and high is not None and low > high:
            raise ValueError(f"PIDController: low ({low}) is above high ({high})")
        if integral_limit is not None and integral_limit < 0:
            raise ValueError(f"PIDController: integral_limit must be >= 0, got {integral_limit}")
        self.target, self.kp, self.ki, self.kd, self.base = float(target), float(kp), float(ki), float(kd), float(base)
        self.low, self.high, self.integral_limit = low, high, integral_limit
        self.integral: float = 0.0
        self.prev_error: float | None = None
        self.value = self._clamp(self.base)

    def _clamp(self, x: float) -> float:
        if self.low is not None:
            x = max(x, self.low)
        return x if self.high is None else min(x, self.high)

    def update(self, measured: float) -> float:
        """Feed one measurement, return the new value."""
        if not math.isfinite(measured):
            raise ValueError(f"PIDController.update got a non-finite measurement {measured}")
        error = float(measured) - self.target
        self.integral += error
        if self.integral_limit is not None:
            self.integral = max(-self.integral_limit, min(self.integral, self.integral_limit))
        derivative = 0.0 if self.prev_error is None else error - self.prev_error
        self.prev_error = error
        self.value = self._clamp(self.base + self.kp * error + self.ki * self.integral + self.kd * derivative)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"integral": self.integral, "prev_error": self.prev_error, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.integral, self.prev_error, self.value = state["integral"], state["prev_error"], state["value"]
