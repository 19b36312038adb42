"""HERON (Bukharin et al. 2023, "Deep reinforcement learning from hierarchical weak preference feedback") as pure
tensor functions: preference labels from several weak feedback signals ranked by importance.

Each response has K feedback signals ``s_1 .. s_K`` (higher is better), ranked so that ``s_1`` matters most. Two
responses a and b are compared down the ranking, like a decision tree::

    for k = 1 .. K:
        if |s_k(a) - s_k(b)| > δ_k:  prefer the one with the larger s_k; stop
    no level decides:               a tie (no label)

δ_k is the margin below which signal k is too weak to decide. The labels train a Bradley–Terry reward model (or
any pairwise loss) in place of human preferences; ties give no pair. No weights between the signals are needed:
only their order, which is what an expert can state when a weighted sum cannot be tuned. docs/heron.md.
"""

from __future__ import annotations

import torch
from torch import Tensor


def heron_preference(signals_a: Tensor, signals_b: Tensor, margins: Tensor) -> tuple[Tensor, Tensor]:
    """Hierarchical comparison of rows of signals (module docstring).

    ``signals_a``, ``signals_b``: (B, K), column 0 the most important; ``margins``: (K,) non-negative δ_k.
    Returns ``(label, level)``: label (B,) is +1 where a is preferred, -1 where b is, 0 for a tie; level (B,) is the
    index k of the deciding signal, K for a tie.
    """
    if signals_a.shape != signals_b.shape or signals_a.dim() != 2:
        raise ValueError(
            f"heron: signals must both be (B, K); got {tuple(signals_a.shape)} and {tuple(signals_b.shape)}"
        )
    if margins.shape != (signals_a.shape[1],) or bool((margins < 0).any()):
        raise ValueError(f"heron: margins must be ({signals_a.shape[1]},) and non-negative; got {margins.tolist()}")
    diff = signals_a - signals_b  # (B, K)
    decides = diff.abs() > margins  # (B, K)
    k = signals_a.shape[1]
    order = torch.arange(k, device=diff.device).expand_as(diff)  # (B, K)
    level = torch.where(decides, order, torch.full_like(order, k)).min(dim=1).values  # (B,)
    picked = diff.gather(1, level.clamp(max=k - 1).unsqueeze(1)).squeeze(1)  # (B,)
    label = torch.where(level < k, torch.sign(picked), torch.zeros_like(picked)).to(torch.long)
    return label, level


def heron_level_counts(level: Tensor, num_signals: int) -> list[int]:
    """How many comparisons each level decided (the last entry: ties)."""
    return torch.bincount(level, minlength=num_signals + 1).tolist()
