"""Nash-MD (Munos et al. 2023, "Nash Learning from Human Feedback"; docs/online_po.md) as pure tensor functions.

Two pieces: the geometric mixture of the current policy and the reference that Nash-MD plays against, and the
Nash-MD-PG policy-gradient loss (the paper's practical algorithm, section 7; TRL's ``NashMDTrainer`` implements the
same estimator). The sampling loop that draws from the mixture is ``alignflow.rollout.mixture``; the controller that
plays the rounds is ``alignflow.trainers.online_po``.

Notation (docs/online_po.md): ``lp_θ[t]``, ``lp_ref[t]`` token log-probs of a response y ~ π_θ, ``LP`` their sums over
the response, ``p = P(y ≻ y')`` the preference model's probability that y beats the opponent y' ~ π_mix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignflow.algorithms.core import masked_sum
from alignflow.algorithms.preference import reduce_rows, weighted_mean


def mixture_logits(policy_logits: Tensor, ref_logits: Tensor, coef: float) -> Tensor:
    """Next-token logits of the geometric mixture ``π_mix ∝ π_θ^(1-β)·π_ref^β`` (β = ``coef``, Nash-MD's ``ητ``).

    ``(1 - β)·log_softmax(policy_logits) + β·log_softmax(ref_logits)``: an unnormalised log-probability whose softmax
    is the per-token geometric mixture (the log-normalisers of the two models only shift each row by a constant, so
    mixing raw logits, as TRL does, gives the same distribution). β = 0 is the policy, β = 1 the reference; β outside
    [0, 1] extrapolates (β = -α gives APO's ``π̂_t^(1+α)·π̂_{t-1}^(-α)``). Shapes (B, V) -> (B, V), float32.
    """
    pol = policy_logits.float().log_softmax(dim=-1)  # (B, V)
    if coef == 0.0:
        return pol
    ref = ref_logits.float().log_softmax(dim=-1)  # (B, V)
    if coef == 1.0:
        return ref
    return (1.0 - coef) * pol + coef * ref


def bt_win_probability(rewards: Tensor, opponent_rewards: Tensor, scale: float = 1.0) -> Tensor:
    """Bradley-Terry preference ``P(y ≻ y') = σ((r(y) - r(y'))/scale)`` from scalar scores; (B,), (B,) -> (B,)."""
    if rewards.shape != opponent_rewards.shape:
        raise ValueError(
            f"bt_win_probability: rewards {tuple(rewards.shape)} and opponent_rewards "
            f"{tuple(opponent_rewards.shape)} differ"
        )
    if scale <= 0:
        raise ValueError(f"bt_win_probability: scale={scale} must be > 0")
    return torch.sigmoid((rewards - opponent_rewards) / scale)


def nash_md_pg_loss(
    policy_token_logps: Tensor,
    ref_token_logps: Tensor,
    mask: Tensor,
    win_prob: Tensor,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Nash-MD-PG: the policy gradient of Nash-MD's regularised game against the mixture opponent.

    For y ~ π_θ, y' ~ π_mix and p = P(y ≻ y'), the paper's gradient estimate is
    ``(p - ½)·∇LP_θ(y) - β·∇KL(π_θ ‖ π_ref)`` (½ is the control variate: the value of the game at the Nash point).
    As a loss, per row::

        l = β·Σ_t sg(lp_θ[t] - lp_ref[t])·lp_θ[t]  -  (p - ½)·Σ_t lp_θ[t]

    The KL term's gradient ``Σ_t (lp_θ[t] - lp_ref[t])·∇lp_θ[t]`` is the per-token k2 gradient (docs/online_rl.md: its
    expectation is ∇KL(π_θ ‖ π_ref) at each prefix); TRL uses the same estimator. The loss VALUE is not an objective
    (it is a surrogate whose gradient is the estimate); only the gradient and the metrics mean anything.
    β = 0.1 (TRL default). Derivation check: one row, lp_θ = (-1, -2), lp_ref = (-1.5, -1), p = 0.8, β = 0.1 gives
    l = 0.1·(0.5·(-1) + (-1)·(-2)) - 0.3·(-3) = 1.05 and ∂l/∂lp_θ = (0.1·0.5 - 0.3, 0.1·(-1) - 0.3) = (-0.25, -0.4).

    Inputs: ``policy_token_logps`` (B, T) with grad, ``ref_token_logps`` (B, T), ``mask`` (B, T) 1 on response
    tokens, ``win_prob`` (B,) in [0, 1]. Metrics: ``nash/win_prob`` (mean p), ``nash/score`` (mean (p - ½)·LP_θ(y)),
    ``nash/kl`` (mean Σ_t (lp_θ - lp_ref), a k1 estimate of the sequence KL(π_θ ‖ π_ref) on y ~ π_θ).
    """
    if policy_token_logps.shape != ref_token_logps.shape or policy_token_logps.shape != mask.shape:
        raise ValueError(
            f"nash_md_pg_loss: policy_token_logps {tuple(policy_token_logps.shape)}, ref_token_logps "
            f"{tuple(ref_token_logps.shape)} and mask {tuple(mask.shape)} must have the same (B, T) shape"
        )
    if win_prob.shape != policy_token_logps.shape[:1]:
        raise ValueError(
            f"nash_md_pg_loss: win_prob has shape {tuple(win_prob.shape)}, expected "
            f"({policy_token_logps.shape[0]},) (one per row)"
        )
    if bool(((win_prob < 0) | (win_prob > 1)).any()):
        raise ValueError("nash_md_pg_loss: win_prob must lie in [0, 1]")
    mask = mask.bool()
    log_ratio = (policy_token_logps - ref_token_logps).detach()  # (B, T)
    seq_lp = masked_sum(policy_token_logps, mask, dim=-1)  # (B,)
    kl_term = masked_sum(log_ratio * policy_token_logps, mask, dim=-1)  # (B,)
    advantage = win_prob.to(seq_lp.dtype) - 0.5  # (B,)
    losses = beta * kl_term - advantage * seq_lp  # (B,)
    metrics = {
        "nash/win_prob": weighted_mean(win_prob, weights),
        "nash/score": weighted_mean(advantage * seq_lp, weights),
        "nash/kl": weighted_mean(masked_sum(log_ratio, mask, dim=-1), weights),
    }
    return reduce_rows(losses, reduction, weights), metrics
