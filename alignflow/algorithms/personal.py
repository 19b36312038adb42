"""P-DPO, personalised DPO (Li et al. 2024, "Personalized Language Modeling from Personalized Human Feedback";
docs/p_dpo.md): a user model conditions the policy, and each preference of user i trains both the user's own
conditioning and the generic (unknown-user) one::

    L = alpha * DPO(x after user i's conditioning) + (1 - alpha) * DPO(x after the generic conditioning)

alpha = 0 is DPO with one shared conditioning; alpha = 1 trains only the individual users.

:func:`p_dpo_loss` takes the two halves as two PrefInputs; :func:`p_dpo_rows_loss` (the ``p_dpo`` row of the loss
table) reads one batch in which every pair appears twice, once after the user's conditioning
(``user_conditioned`` = 1) and once after the generic one (0), as ``alignflow po`` lays them out with learned user
embeddings (``alignflow.trainers.po_users``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignflow.algorithms.preference import PrefInputs, dpo_loss, reduce_rows, weighted_mean


def p_dpo_loss(
    user: PrefInputs, generic: PrefInputs, *, alpha: float = 0.5, beta: float = 0.1
) -> tuple[Tensor, dict[str, Tensor]]:
    """``alpha * mean DPO(user) + (1 - alpha) * mean DPO(generic)``: ``user`` and ``generic`` hold the policy and
    reference log-probs of the same pairs after the user's and after the generic conditioning. Metrics:
    ``p_dpo/user_loss``, ``p_dpo/generic_loss`` and the user half's DPO metrics."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"p_dpo_loss: alpha={alpha} is outside [0, 1]")
    lu, mu = dpo_loss(user, beta=beta)
    lg, _ = dpo_loss(generic, beta=beta)
    return alpha * lu + (1.0 - alpha) * lg, {"p_dpo/user_loss": lu.detach(), "p_dpo/generic_loss": lg.detach()} | mu


def p_dpo_rows_loss(
    inputs: PrefInputs,
    *,
    alpha: float = 0.5,
    beta: float = 0.1,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """P-DPO over rows that hold each pair twice (module docstring): row r's loss is ``2 * alpha * l_r`` after the
    user's conditioning and ``2 * (1 - alpha) * l_r`` after the generic one, l_r = -log sigmoid(beta * h_r) (DPO).
    With every pair once each way, the mean over the 2B rows is (1/2B) sum_pairs (2 alpha l_u + 2 (1 - alpha) l_g)
    = (1/B) sum_pairs (alpha l_u + (1 - alpha) l_g), the P-DPO loss of :func:`p_dpo_loss`. Metrics: those of DPO
    over all rows, ``p_dpo/user_loss``, ``p_dpo/generic_loss`` (mean DPO loss of each half) and
    ``p_dpo/user_accuracy``, ``p_dpo/generic_accuracy`` (implicit-reward accuracy of each half)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"p_dpo_rows_loss: alpha={alpha} is outside [0, 1]")
    (flag,) = inputs.need("p_dpo_rows_loss", "user_conditioned")
    user = flag > 0.5  # (B,)
    raw, metrics = dpo_loss(inputs, beta=beta, reduction="none")  # (B,) DPO losses l_r
    if weights is not None:
        metrics = dpo_loss(inputs, beta=beta, reduction="none", weights=weights)[1]
    scale = torch.where(user, 2.0 * alpha, 2.0 * (1.0 - alpha)).to(raw.dtype)
    loss = reduce_rows(raw * scale, reduction, weights)
    pc, rc, pr, rr = inputs.need(
        "p_dpo_rows_loss", "policy_chosen_logps", "ref_chosen_logps", "policy_rejected_logps", "ref_rejected_logps"
    )
    h = (pc - rc) - (pr - rr)
    right = (h > 0).float()
    for name, part in (("user", user), ("generic", ~user)):
        w = part.float() if weights is None else part.float() * weights
        some = bool(part.any())
        metrics[f"p_dpo/{name}_loss"] = weighted_mean(raw, w) if some else raw.new_zeros(()).detach()
        metrics[f"p_dpo/{name}_accuracy"] = weighted_mean(right, w) if some else raw.new_zeros(()).detach()
    return loss, metrics
