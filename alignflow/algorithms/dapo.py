"""DAPO's data-side pieces (Yu et al. 2025, "DAPO", arXiv:2503.14476; docs/dapo.md).

The loss side of DAPO is :func:`alignflow.algorithms.policy.ppo_policy_loss` with ``clip_high=0.28`` and
``agg="token_mean"``; here are dynamic sampling and overlong reward shaping.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def dynamic_sampling_filter(scores: Tensor, group_size: int, atol: float = 0.0) -> Tensor:
    """Keep only groups whose rewards are not all equal (0 < #correct < G for 0/1 rewards, i.e. std_g > 0).

    Such groups have zero GRPO advantage everywhere and contribute no gradient; DAPO drops them and samples more
    prompts until the batch is full (the refill loop is the trainer's). ``atol`` treats a spread ``max − min ≤ atol``
    as equal. Shapes: scores (N,) prompt-major (N = prompts·G) -> keep mask (N,) bool, equal within each group.
    """
    n = scores.shape[0]
    if scores.dim() != 1 or group_size < 1 or n % group_size:
        raise ValueError(
            f"scores of shape {tuple(scores.shape)} cannot be split into groups of group_size={group_size}"
        )
    grouped = scores.reshape(n // group_size, group_size)  # (N/G, G)
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values  # (N/G,)
    keep_group = spread > atol  # (N/G,)
    return keep_group.repeat_interleave(group_size)  # (N,)


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO soft overlong punishment, added to the rule reward.

    ``R_len(y) = 0`` if ``|y| ≤ L_max − L_cache``; ``((L_max − L_cache) − |y|) / L_cache`` if
    ``L_max − L_cache < |y| ≤ L_max``; ``−1`` if ``|y| > L_max``. Defaults in the paper: L_max = 20480,
    L_cache = 4096. Shapes: lengths (B,) response lengths in tokens -> (B,) float penalties in [−1, 0].
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(
            f"overlong penalty needs 0 < cache_len <= max_len; got cache_len={cache_len}, max_len={max_len}"
        )
    lengths = lengths.to(torch.float32)
    soft_start = float(max_len - cache_len)
    linear = (soft_start - lengths) / cache_len  # (B,)
    penalty = torch.where(lengths <= soft_start, torch.zeros_like(lengths), linear)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)
