"""Pairwise RLHF advantages: a sample's advantage from pairwise preferences instead of a scalar reward.

A preference model or a pairwise judge gives ``P[i, j] = P(y_i > y_j | x)`` for the G samples of one prompt's
group (``docs/pairwise_rlhf.md``). Two readings:

* **within the group** -- each sample's win rate against the others, centred::

      w_i = 1/(G-1) * sum_{j != i} P[i, j]          A_i = w_i - 1/2

  When ``P`` is symmetric (``P[i, j] + P[j, i] = 1``) the ``w_i`` of a group average exactly 1/2, so the
  advantages sum to zero like GRPO's group-centred ones; the diagonal is never read.
* **against an anchor** -- ``p_i = P(y_i > y_anchor | x)`` for a fixed anchor response (a reference answer, a
  greedy sample): ``A_i = p_i - 1/2``, or ``p_i - mean_group(p)`` when ``center`` (a group baseline).

Both are pure functions of tensors; the advantages are per sequence (broadcast over the response's tokens).

**Scaled** (Think-RM's normalisation, :func:`normalized_win_rate_advantages`): with the margins
``d_ij = P[i, j] - 1/2`` (``d_ii = 0``)::

      A_i = (1/G) Σ_j d_ij / sqrt( Σ_{i,j} d_ij² / (2 G (G-1)) + eps )

When ``d_ij = r_i - r_j`` for scalar scores ``r`` this is exactly GRPO's ``(r_i - mean(r)) / std(r)`` (unbiased
std, eps = 0): ``Σ_j d_ij = G (r_i - mean r)`` and ``Σ_{i,j} (r_i - r_j)² = 2 G Σ_i (r_i - mean r)²``. A scorer
whose probabilities stay near 1/2 then gives advantages of order one, as GRPO's do, instead of ``±|d|``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def group_win_rate_advantages(pref: Tensor) -> Tensor:
    """(..., G, G) preference matrices -> (..., G) advantages ``w_i - 1/2`` (module docstring); G >= 2."""
    if pref.dim() < 2 or pref.shape[-1] != pref.shape[-2]:
        raise ValueError(f"pairwise advantages: expected (..., G, G) preferences, got shape {tuple(pref.shape)}")
    g = pref.shape[-1]
    if g < 2:
        raise ValueError("pairwise advantages: a group needs at least 2 samples to compare")
    off = 1.0 - torch.eye(g, dtype=pref.dtype, device=pref.device)
    win_rate = (pref * off).sum(-1) / (g - 1)
    return win_rate - 0.5


def normalized_win_rate_advantages(pref: Tensor, eps: float = 1e-6) -> Tensor:
    """(..., G, G) preference matrices -> (..., G) Think-RM-scaled advantages (module docstring); G >= 2.

    The diagonal is never read. A group whose margins are all 0 gets advantages 0."""
    g = pref.shape[-1]
    group_win_rate_advantages(pref)  # the shape checks
    off = 1.0 - torch.eye(g, dtype=pref.dtype, device=pref.device)
    d = (pref - 0.5) * off
    scale = ((d * d).sum((-2, -1)) / (2 * g * (g - 1)) + eps).sqrt()
    return d.sum(-1) / g / scale.unsqueeze(-1)


def anchor_advantages(p_vs_anchor: Tensor, center: bool = False) -> Tensor:
    """(..., G) probabilities of beating the anchor -> (..., G) advantages ``p - 1/2`` or ``p - mean(p)``."""
    if center:
        return p_vs_anchor - p_vs_anchor.mean(-1, keepdim=True)
    return p_vs_anchor - 0.5


def preference_matrix(win_prob: Callable[[str, str], float], responses: Sequence[str]) -> Tensor:
    """The (G, G) matrix ``P[i, j] = win_prob(responses[i], responses[j])`` of one group (diagonal 1/2).

    ``win_prob(a, b)`` is any pairwise scorer: a preference model's P(a > b) or a judge's verdict (1, 0, or the
    fraction of wins over both orders)."""
    g = len(responses)
    pref = torch.full((g, g), 0.5)
    for i in range(g):
        for j in range(g):
            if i != j:
                pref[i, j] = float(win_prob(responses[i], responses[j]))
    return pref
