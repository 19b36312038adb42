"""P-DPO, personalised DPO (Li et al. 2024, "Personalized Language Modeling from Personalized Human Feedback";
docs/p_dpo.md): a user model conditions the policy, and each preference of user i trains both the user's own
conditioning and the generic (unknown-user) one::

    L = alpha * DPO(x after user i's conditioning) + (1 - alpha) * DPO(x after the generic conditioning)

alpha = 0 is DPO with one shared conditioning; alpha = 1 trains only the individual users.
"""

from __future__ import annotations

from torch import Tensor

from alignflow.algorithms.preference import PrefInputs, dpo_loss


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
