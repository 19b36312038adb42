"""The DPO policy's implicit token-level reward ("From r to Q*", Rafailov et al. 2024) as pure tensor functions.

A policy trained with DPO against π_ref defines a reward per token, ``r_t = β·(log π(y_t | x, y_<t) − log π_ref(y_t |
x, y_<t))``; their sum over a response is DPO's implicit sequence reward ``β·log π(y|x)/π_ref(y|x)``. The paper reads
the per-token terms as a dense reward (credit assignment: which tokens the preference was about) and their running
sum as the score of a partial response for search at decoding time (beam search on the implicit reward,
``alignflow.rollout.implicit_search``). docs/implicit_reward.md.
"""

from __future__ import annotations

from torch import Tensor


def implicit_token_rewards(
    policy_token_logps: Tensor, ref_token_logps: Tensor, mask: Tensor, beta: float = 0.1
) -> Tensor:
    """(B, T) ``β·(lp_θ − lp_ref)`` on the response tokens (``mask``), 0 elsewhere."""
    if policy_token_logps.shape != ref_token_logps.shape or policy_token_logps.shape != mask.shape:
        raise ValueError(
            f"implicit_token_rewards: shapes differ: {tuple(policy_token_logps.shape)}, "
            f"{tuple(ref_token_logps.shape)}, {tuple(mask.shape)}"
        )
    return beta * (policy_token_logps - ref_token_logps) * mask.to(policy_token_logps.dtype)


def implicit_prefix_scores(token_rewards: Tensor) -> Tensor:
    """(B, T) running sums ``Σ_{s ≤ t} r_s``: the implicit reward of each prefix; the last real position holds the
    sequence's implicit reward."""
    return token_rewards.cumsum(-1)


def credit_shares(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """(B, T) each token's share of its response's total |implicit reward|, ``|r_t| / Σ_s |r_s|`` (0 for a response
    whose tokens all have r = 0): where the credit of a preference lies."""
    a = token_rewards.abs() * mask.to(token_rewards.dtype)
    total = a.sum(-1, keepdim=True)
    return a / total.clamp(min=1e-12)
