"""Safe RLHF, PPO-Lagrangian (Dai et al. 2023, "Safe RLHF", arXiv:2310.12773; docs/safe_rlhf.md).

``max_θ min_{λ≥0} E[R] − λ·(E[C] − d)``: a reward critic and a cost critic each get GAE on their own shaped
per-token signal (:func:`safe_shaped_rewards`); the actor uses the combined advantage
(:func:`safe_combined_advantages`) inside the ordinary PPO clip; λ follows :class:`LagrangeMultiplier`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from alignflow.algorithms.kl import kl_penalty_rewards

Tensor = torch.Tensor


def safe_combined_advantages(reward_adv: Tensor, cost_adv: Tensor, lam: float | Tensor) -> Tensor:
    """Actor advantage ``Â = (Â_R − λ·Â_C) / (1 + λ)``. λ = 0 gives plain PPO on the reward.

    Dividing by 1 + λ keeps the advantage scale bounded as λ grows. Shapes: reward_adv, cost_adv (B, T) or (B,);
    λ a float or 0-dim tensor (detached: no gradient reaches the multiplier through the actor).
    """
    if reward_adv.shape != cost_adv.shape:
        raise ValueError(
            f"reward and cost advantages differ in shape: {tuple(reward_adv.shape)} vs {tuple(cost_adv.shape)}"
        )
    lam = lam.detach() if isinstance(lam, Tensor) else float(lam)
    return (reward_adv - lam * cost_adv) / (1.0 + lam)


def safe_shaped_rewards(
    rewards: Tensor,
    costs: Tensor,
    logp_old: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    beta: float,
    clip: float | None = 50.0,
) -> tuple[Tensor, Tensor]:
    """Per-token reward and cost: ``r_t = −β·k1_t + 1[t = last]·R``, ``c_t = +β·k1_t + 1[t = last]·C``.

    The KL term pushes the same way in both: it lowers the reward and raises the cost. Both are clipped to
    ``±clip`` per token (50 in Safe RLHF; ``None`` disables). Shapes: rewards, costs (B,); logp_old, ref_logp,
    mask (B, T) -> two (B, T) tensors, 0 outside the mask.
    """
    token_rewards = kl_penalty_rewards(rewards, logp_old, ref_logp, mask, beta, "k1")  # (B, T)
    token_costs = kl_penalty_rewards(costs, logp_old, ref_logp, mask, -beta, "k1")  # (B, T)
    if clip is not None:
        token_rewards, token_costs = token_rewards.clamp(-clip, clip), token_costs.clamp(-clip, clip)
    return token_rewards, token_costs


class LagrangeMultiplier:
    """Lagrange multiplier λ ≥ 0 of the cost constraint ``E[C] ≤ d``, parametrised as ``λ = exp(log λ)``.

    Each :meth:`update` adds the batch's episode costs to a sliding window (``window`` most recent), takes its
    mean ``C̄``, and does one SGD step on the loss ``L(log λ) = −(C̄ − d)·λ``, whose gradient is ``−(C̄ − d)·λ``:
    ``log λ ← log λ + lr·(C̄ − d)·λ``, then ``log λ ≤ log λ_max``. So λ grows while the expected cost is above the
    threshold and shrinks (geometrically towards 0, never below) while it is below.
    Defaults (Safe RLHF): d = 0, λ_init = 1.0, lr = 0.1, λ_max = 5.0, window 128.
    """

    def __init__(
        self,
        init: float = 1.0,
        lr: float = 0.1,
        max_value: float | None = 5.0,
        threshold: float = 0.0,
        window: int = 128,
    ):
        if init <= 0:
            raise ValueError(f"Lagrange multiplier init must be > 0 (it is exp(log λ)); got {init}")
        if max_value is not None and max_value < init:
            raise ValueError(f"Lagrange multiplier max_value ({max_value}) is below init ({init})")
        if lr <= 0 or window < 1:
            raise ValueError(f"Lagrange multiplier needs lr > 0 and window >= 1; got lr={lr}, window={window}")
        self.log_lambda = math.log(init)
        self.lr = float(lr)
        self.log_max = None if max_value is None else math.log(max_value)
        self.threshold = float(threshold)
        self.costs: deque[float] = deque(maxlen=int(window))

    @property
    def value(self) -> float:
        """λ = exp(log λ)."""
        return math.exp(self.log_lambda)

    def update(self, episode_costs: Tensor | Sequence[float]) -> float:
        """Add episode costs C (one per response, (B,)), take one step, return the new λ."""
        values = (
            episode_costs.detach().flatten().tolist()
            if isinstance(episode_costs, Tensor)
            else [float(c) for c in episode_costs]
        )
        if not values:
            raise ValueError("LagrangeMultiplier.update got no episode costs")
        if any(not math.isfinite(c) for c in values):
            raise ValueError(f"LagrangeMultiplier.update got non-finite episode costs: {values[:10]}")
        self.costs.extend(values)
        mean_cost = sum(self.costs) / len(self.costs)
        self.log_lambda += self.lr * (mean_cost - self.threshold) * self.value
        if self.log_max is not None:
            self.log_lambda = min(self.log_lambda, self.log_max)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"log_lambda": self.log_lambda, "costs": list(self.costs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_lambda = float(state["log_lambda"])
        self.costs.clear()
        self.costs.extend(float(c) for c in state["costs"])
