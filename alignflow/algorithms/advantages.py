"""Advantage estimators for online RL (docs/online_rl.md; per algorithm docs/<algo>.md).

All are pure functions without gradients (advantages are targets, never differentiated). Token-level inputs are
(B, T) with a (B, T) ``mask`` of response tokens; left, right or interior padding are all handled the same way:
masked positions are *transparent* (a recursion over time skips them, so the token after a gap is the next valid
one) and come back as 0. Group-level estimators take sequence scores (N,) with ``N = num_prompts · G`` laid out
prompt-major (the G samples of a prompt are consecutive) when given ``group_size``, or any layout with ``group_ids``.

The table :data:`ADVANTAGE_ESTIMATORS` maps config names to functions; their signatures differ by family
(critic-based, group-based, baseline-based), as the inputs really differ.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Union

import torch

from alignflow.algorithms.core import masked_whiten

Tensor = torch.Tensor
# one group id per sample: a (N,) tensor or hashables (prompt uids); a runtime alias, so typing.Union
GroupIds = Union[Tensor, Sequence[Hashable]]  # noqa: UP007


@torch.no_grad()
def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438), as used by InstructGPT PPO.

    ``δ_t = r_t + γ·V_{t+1} − V_t`` (``V`` after the last valid token is 0), ``Â_t = δ_t + γλ·Â_{t+1}``,
    returns ``G_t = Â_t + V_t``. "t+1" means the next *valid* position of the row. λ = γ = 1 gives the Monte-Carlo
    ``Â_t = Σ_{s≥t} r_s − V_t``; λ = 0 gives the TD residual ``Â_t = δ_t``.

    Shapes: token_rewards, values, mask (B, T). Returns (advantages, returns), both (B, T), 0 outside the mask.
    One vectorised step per time position (T steps over all B rows at once).
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(m, token_rewards.to(values.dtype), zero)  # (B, T)
    v = torch.where(m, values, zero)  # (B, T)
    advantages = torch.zeros_like(v)  # (B, T)
    next_value = torch.zeros_like(v[:, 0])  # (B,)
    next_adv = torch.zeros_like(v[:, 0])  # (B,)
    for t in range(v.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        valid = m[:, t]
        advantages[:, t] = torch.where(valid, adv_t, zero)
        next_value = torch.where(valid, v[:, t], next_value)
        next_adv = torch.where(valid, adv_t, next_adv)
    returns = torch.where(m, advantages + v, zero)
    return advantages, returns


def returns_to_go(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted return ``G_t = Σ_{s≥t, valid} γ^{k(s)−k(t)} r_s`` over valid positions (k = valid-token index).

    It is :func:`gae` with V = 0 and λ = 1 (the formula lives there). Shapes: (B, T) -> (B, T), 0 outside the mask.
    """
    rewards = token_rewards if token_rewards.is_floating_point() else token_rewards.float()
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)  # (B, T)
    return advantages


def _group_index(
    n: int, group_ids: GroupIds | None, group_size: int | None, device: torch.device
) -> tuple[Tensor, int]:
    """Map N samples to dense group indices (N,) in [0, num_groups). Exactly one of group_ids / group_size."""
    if (group_ids is None) == (group_size is None):
        raise ValueError("pass exactly one of group_ids (one id per sample) or group_size (samples per prompt)")
    if group_size is not None:
        if group_size < 1 or n % group_size:
            raise ValueError(f"{n} scores cannot be split into groups of group_size={group_size}")
        return torch.arange(n, device=device) // group_size, n // group_size
    assert group_ids is not None  # exactly one of group_ids / group_size is set (checked above)
    ids = group_ids if isinstance(group_ids, Tensor) else torch.tensor(_dense_ids(group_ids), dtype=torch.long)
    if ids.shape != (n,):
        raise ValueError(f"group_ids must have one id per score, shape ({n},); got {tuple(ids.shape)}")
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse.to(device), int(uniq.numel())


def _dense_ids(names: Sequence[Hashable]) -> list[int]:
    """Hashable group ids (ints, prompt uids, ...) -> integers in first-seen order."""
    table: dict[Hashable, int] = {}
    return [table.setdefault(name, len(table)) for name in names]


def _group_stats(scores: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group count, group mean and unbiased group variance, each (N,)."""
    ones = torch.ones_like(scores)
    count = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device).index_add_(0, index, ones)  # (G_n,)
    total = torch.zeros_like(count).index_add_(0, index, scores)  # (G_n,)
    mean = total / count  # (G_n,)
    sq = torch.zeros_like(count).index_add_(0, index, (scores - mean[index]) ** 2)  # (G_n,)
    var = sq / (count - 1).clamp(min=1)  # (G_n,); 0 for a singleton group
    return count[index], mean[index], var[index]


@torch.no_grad()
def grpo_advantages(
    scores: Tensor,
    group_ids: GroupIds | None = None,
    group_size: int | None = None,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO outcome advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300): ``Â_i = (r_i − mean_g r)/(std_g r
    + ε)``.

    ``std`` is unbiased (Bessel, as ``torch.std`` in TRL/verl). ``norm_by_std=False`` gives Dr. GRPO (Liu et al. 2025,
    arXiv:2503.20783): ``Â_i = r_i − mean_g r``. A group of equal rewards (or a single sample) gets Â = 0.
    Shapes: scores (N,) -> (N,) sequence advantages; use :func:`broadcast_to_tokens` for (B, T).
    """
    index, num_groups = _group_index(scores.shape[0], group_ids, group_size, scores.device)
    scores = scores.float() if not scores.is_floating_point() else scores
    _, mean, var = _group_stats(scores, index, num_groups)
    centred = scores - mean  # (N,)
    return centred / (var.sqrt() + eps) if norm_by_std else centred


def dr_grpo_advantages(scores: Tensor, group_ids: GroupIds | None = None, group_size: int | None = None) -> Tensor:
    """Dr. GRPO advantage ``r_i − mean_g r``: :func:`grpo_advantages` with ``norm_by_std=False``."""
    return grpo_advantages(scores, group_ids, group_size, norm_by_std=False)


@torch.no_grad()
def rloo_advantages(scores: Tensor, group_size: int | None = None, group_ids: GroupIds | None = None) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740; Kool et al. 2019).

    ``A_i = R_i − (1/(k−1)) Σ_{j≠i} R_j = (k/(k−1))·(R_i − mean_g R)``. ``R`` may already include ``−β·Σ_t k1``.
    Every group needs k ≥ 2. Shapes: scores (N,) -> (N,).
    """
    index, num_groups = _group_index(scores.shape[0], group_ids, group_size, scores.device)
    scores = scores.float() if not scores.is_floating_point() else scores
    count, mean, _ = _group_stats(scores, index, num_groups)
    if (count < 2).any():
        bad = torch.nonzero(count < 2).flatten().tolist()
        raise ValueError(f"RLOO needs at least 2 samples per prompt; samples {bad[:10]} are alone in their group")
    return count / (count - 1) * (scores - mean)


@torch.no_grad()
def remax_advantages(scores: Tensor, greedy_scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """ReMax (Li et al. 2023, arXiv:2310.10505): REINFORCE with the greedy decode's reward as baseline.

    Sequence form: ``A_i = R(x_i, y_i) − R(x_i, ȳ_i)``, scores (B,), greedy_scores (B,) -> (B,).
    Token form (``scores`` are (B, T) KL-shaped token rewards and ``mask`` is given):
    ``Â_t = Σ_{s≥t} r_s − R(x, ȳ)`` -> (B, T), 0 outside the mask.
    """
    if scores.dim() == 1:
        return scores - greedy_scores
    if mask is None:
        raise ValueError("remax_advantages with (B, T) token rewards needs the (B, T) response mask")
    returns = returns_to_go(scores, mask, gamma=1.0)  # (B, T)
    return torch.where(mask.bool(), returns - greedy_scores[:, None].to(returns.dtype), 0.0)


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0, eps: float = 1e-8) -> Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): returns-to-go whitened over all valid tokens of the global batch.

    ``G_t = Σ_{s≥t} γ^{s−t} r_s`` with ``r_t = −β·KL_t + 1[t = last]·R`` (:func:`kl_penalty_rewards`), then
    ``Â = (G − mean(G)) / std(G)`` over every valid token of the batch (no critic, no grouping). For the
    REINFORCE++-baseline variant, subtract the group mean from R first (:func:`dr_grpo_advantages`).
    Shapes: token_rewards, mask (B, T) -> (B, T). Under data parallelism, call it on the gathered batch.
    """
    returns = returns_to_go(token_rewards, mask, gamma)  # (B, T)
    return masked_whiten(returns, mask, shift_mean=True, eps=eps)


def broadcast_to_tokens(seq_values: Tensor, mask: Tensor) -> Tensor:
    """Give every valid token of row i the sequence value ``seq_values[i]``: (B,) -> (B, T), 0 outside the mask."""
    if seq_values.shape != mask.shape[:1]:
        raise ValueError(f"sequence values must have shape ({mask.shape[0]},); got {tuple(seq_values.shape)}")
    return torch.where(
        mask.bool(), seq_values[:, None], torch.zeros((), dtype=seq_values.dtype, device=seq_values.device)
    )  # (B, T)


ADVANTAGE_ESTIMATORS = {
    "gae": gae,
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "remax": remax_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}
