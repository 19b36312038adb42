"""MAPL (Sun et al. 2025, "Multi-level aware preference learning") as pure tensor functions: preferences between
responses AND between instructions, in the DPO form.

Notation as docs/preference.md: ``Δ(x, y) = LP_θ(y | x) - LP_ref(y | x)`` and ``ℓ(z) = -log σ(z)``. Three kinds of
pairs, built from instructions whose constraints a response does or does not satisfy (alignflow/tasks/constraints.py):

* response level (ordinary DPO): one instruction x, answers y_w (satisfies its constraints) and y_l (does not):
  ``h_resp = Δ(x, y_w) - Δ(x, y_l)``;
* intra-sample (prompt level): one answer y, instructions x_w (whose constraints y satisfies) and x_l (which y
  violates): ``h_intra = Δ(x_w, y) - Δ(x_l, y)`` -- the response-conditioned Bradley–Terry comparison;
* inter-sample: a pair (x, y_w, y_l) and the same pair under x⁺, x with one more constraint that y_w satisfies and
  y_l does not: ``h_inter = h(x⁺) - h(x)`` with ``h(x) = Δ(x, y_w) - Δ(x, y_l)``; the added constraint should widen
  the margin.

``L = ℓ(β·h_resp) + w_intra·ℓ(β·h_intra) + w_inter·ℓ(β·h_inter)``, each term averaged over its own rows.
The DPO form of the prompt-level terms drops ``β·log Z(x_w) - β·log Z(x_l)`` (the partition functions of two
different prompts do not cancel); this, and the exact inter-sample objective, are our reading of the paper
(unverified). docs/mapl.md.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from alignflow.algorithms.preference import LossOut


def mapl_loss(
    h_resp: Tensor, h_intra: Tensor, h_inter: Tensor, *, beta: float = 0.1, w_intra: float = 1.0, w_inter: float = 1.0
) -> LossOut:
    """MAPL in the DPO form (module docstring). Each ``h_*`` is a (B_*,) margin of log-ratio differences; an empty
    tensor drops its term. Metrics: ``mapl/<level>_loss`` and ``mapl/<level>_accuracy`` (fraction with h > 0)."""
    terms = {"resp": (h_resp, 1.0), "intra": (h_intra, w_intra), "inter": (h_inter, w_inter)}
    if all(h.numel() == 0 for h, _ in terms.values()):
        raise ValueError("mapl_loss: every level is empty; give at least one pair")
    loss = h_resp.new_zeros(())
    metrics = {}
    for name, (h, w) in terms.items():
        if h.numel() == 0:
            continue
        term = F.softplus(-beta * h).mean()  # ℓ(βh) = -log σ(βh)
        loss = loss + w * term
        metrics[f"mapl/{name}_loss"] = term.detach()
        metrics[f"mapl/{name}_accuracy"] = (h > 0).float().mean().detach()
    return loss, metrics


def margins_from_logps(policy_w: Tensor, ref_w: Tensor, policy_l: Tensor, ref_l: Tensor) -> Tensor:
    """``Δ_w - Δ_l = (LP_θ(w) - LP_ref(w)) - (LP_θ(l) - LP_ref(l))`` for any level: for the intra-sample level w
    and l are the same answer under the two instructions."""
    return (policy_w - ref_w) - (policy_l - ref_l)
