"""Pairwise preference model P(y ≻ y' | x): its loss and its probability (docs/pairwise_rm.md).

A sequence classifier reads the prompt and BOTH responses, ``x ⊕ y ⊕ y'``, and outputs one logit ``z(x, y, y')``.
Every training pair (x, y_c, y_r) is shown in both orders, so the model cannot learn "the first one wins":
``z_ab = z(x, y_c, y_r)`` (label: the first wins) and ``z_ba = z(x, y_r, y_c)`` (label: the second wins).

Two readings of the logit (``symmetric``):

* **measured** (``symmetric=False``): ``P(y ≻ y') = σ(z(x, y, y'))``. Loss, the binary cross-entropy of both
  orders::

      L = ½ [ -log σ(z_ab) - log(1 - σ(z_ba)) ] = ½ [ softplus(-z_ab) + softplus(z_ba) ]

  Nothing forces ``P(y ≻ y') + P(y' ≻ y) = 1``; the gap ``|σ(z_ab) + σ(z_ba) - 1|`` is reported as
  ``pm/symmetry_gap``.
* **enforced** (``symmetric=True``): ``P(y ≻ y') = σ(s)`` with ``s = ½ (z(x, y, y') - z(x, y', y))``, so
  ``P(y ≻ y') + P(y' ≻ y) = σ(s) + σ(-s) = 1`` exactly. Loss ``L = -log σ(s_ab) = softplus(-½ (z_ab - z_ba))``
  (the two orders give the same term). Its gap is 0 by construction.

Hand values (tested): z_ab = 2, z_ba = -1. Measured: L = ½ (softplus(-2) + softplus(-1)) = ½ (0.126928 +
0.313262) = 0.220095, ∂L/∂z_ab = -½ σ(-2) = -0.059601, ∂L/∂z_ba = ½ σ(-1) = 0.134471, gap |0.880797 + 0.268941 -
1| = 0.149738. Enforced: s = 1.5, L = softplus(-1.5) = 0.201413, ∂L/∂z_ab = -½ σ(-1.5) = -0.091213 = -∂L/∂z_ba.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def win_logit(z_ab: Tensor, z_ba: Tensor | None = None, symmetric: bool = False) -> Tensor:
    """The logit of P(y ≻ y'): ``z_ab`` (measured) or ``½ (z_ab - z_ba)`` (enforced); (B,) -> (B,)."""
    if not symmetric:
        return z_ab
    if z_ba is None:
        raise ValueError("win_logit: symmetric=True needs z_ba, the logit of the swapped order")
    return 0.5 * (z_ab - z_ba)


def pairwise_preference_loss(z_ab: Tensor, z_ba: Tensor, symmetric: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss (mean over pairs) of a pairwise preference model on pairs shown in both orders.

    z_ab: (B,) logits of (x, chosen, rejected); z_ba: (B,) logits of (x, rejected, chosen). Metrics (tensors):
    ``pm/accuracy`` (P(chosen ≻ rejected) > ½), ``pm/win_prob`` (its mean), ``pm/symmetry_gap`` (mean
    |P(c ≻ r) + P(r ≻ c) - 1|), ``pm/order_agreement`` (fraction of pairs where both orders pick the same side).
    """
    if z_ab.shape != z_ba.shape or z_ab.dim() != 1:
        raise ValueError(
            f"pairwise_preference_loss: z_ab {tuple(z_ab.shape)} and z_ba {tuple(z_ba.shape)} must both be (B,)"
        )
    z_ab, z_ba = z_ab.float(), z_ba.float()
    if symmetric:
        s = win_logit(z_ab, z_ba, True)  # (B,)
        per = F.softplus(-s)
        p_ab, p_ba = torch.sigmoid(s), torch.sigmoid(-s)
    else:
        per = 0.5 * (F.softplus(-z_ab) + F.softplus(z_ba))
        p_ab, p_ba = torch.sigmoid(z_ab), torch.sigmoid(z_ba)
    d = p_ab.detach(), p_ba.detach()
    metrics = {
        "pm/accuracy": (d[0] > 0.5).float().mean(),
        "pm/win_prob": d[0].mean(),
        "pm/symmetry_gap": (d[0] + d[1] - 1).abs().mean(),
        "pm/order_agreement": ((d[0] > 0.5) == (d[1] < 0.5)).float().mean(),
    }
    return per.mean(), metrics
