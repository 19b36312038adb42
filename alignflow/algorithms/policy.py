"""Policy, value and entropy losses for online RL (docs/online_rl.md; per algorithm docs/<algo>.md).

Every loss is a pure function: (B, T) tensors in, ``(loss, metrics)`` out. Losses are *minimised* (the negated
objective). ``agg`` picks the aggregation mode (:data:`alignflow.algorithms.core.AGG_MODES`); ``norm_len``,
``global_tokens`` and ``global_seqs`` are passed through to :func:`~alignflow.algorithms.core.aggregate` (use them
for gradient accumulation). GRPO, Dr. GRPO and DAPO are all :func:`ppo_policy_loss` with different knobs:

==========  ==========================  ====================  ===========================
method      advantages                  agg                   clip (low, high)
==========  ==========================  ====================  ===========================
GRPO        grpo (norm_by_std=True)     seq_mean_token_mean   (0.2, 0.2) + β·k3 kl_loss
Dr. GRPO    grpo (norm_by_std=False)    seq_mean_token_sum_norm (0.2, 0.2), norm_len=L_max
DAPO        grpo (norm_by_std=True)     token_mean            (0.2, 0.28)
==========  ==========================  ====================  ===========================

Metric values are detached 0-dim tensors (no device sync); call ``.item()`` when logging.
"""

from __future__ import annotations

import torch

from alignflow.algorithms.core import aggregate, masked_mean, zero_invalid
from alignflow.algorithms.kl import kl_k3

Tensor = torch.Tensor

_LOG_RATIO_CLAMP = 20.0  # keeps exp() finite for garbage or diverged positions


def _check_shapes(mask: Tensor, **tensors: Tensor) -> None:
    for name, x in tensors.items():
        if x.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected the mask's shape {tuple(mask.shape)} (B, T)")


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float, dual_clip: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``max(−Â·ρ, −Â·clip(ρ, 1−ε_low, 1+ε_high))`` with the optional dual clip; also the clip indicators."""
    loss_unclipped = -advantages * ratio  # (B, T)
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    dual = torch.zeros_like(clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (typically 3); got {dual_clip}")
        cap = -advantages * dual_clip  # (B, T); only binds where Â < 0
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
    return loss, clipped, dual


def ppo_policy_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token_mean",
    norm_len: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347; InstructGPT; docs/ppo.md).

    ``ρ_t = exp(lp_θ − lp_old)``, ``L = agg_t max(−Â_t·ρ_t, −Â_t·clip(ρ_t, 1−ε_low, 1+ε_high))``.
    ``clip_high > clip_low`` is DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476: 0.2 / 0.28).
    ``dual_clip = c > 1`` (Ye et al. 2020, arXiv:1912.09729) also caps the loss of negative-advantage tokens at
    ``−c·Â`` so that a huge ratio on a bad token cannot blow up the update.

    Shapes: logp (B, T) with gradient; logp_old, advantages, mask (B, T). Advantages (B,) are broadcast to tokens.
    Metrics: ``policy/clipfrac`` (fraction of valid tokens where the clip is active), ``policy/dual_clipfrac``,
    ``policy/approx_kl`` (mean k3 estimate of KL(π_old‖π_θ) = mean of (ρ − 1) − log ρ), ``policy/ratio_mean``.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(mask)  # (B, T)
    _check_shapes(mask, logp=logp, logp_old=logp_old, advantages=advantages)
    logp, logp_old, advantages = (zero_invalid(x, mask) for x in (logp, logp_old, advantages))
    log_ratio = (logp - logp_old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # (B, T)
    ratio = torch.exp(log_ratio)
    loss_tokens, clipped, dual = _clipped_surrogate(ratio, advantages.detach(), clip_low, clip_high, dual_clip)
    loss = aggregate(loss_tokens, mask, agg, norm_len, global_tokens, global_seqs)
    with torch.no_grad():
        metrics = {
            "policy/clipfrac": masked_mean(clipped.float(), mask),
            "policy/dual_clipfrac": masked_mean(dual.float(), mask),
            "policy/approx_kl": masked_mean(kl_k3(logp_old, logp), mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def gspo_policy_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    agg: str = "seq_mean_token_mean",
    norm_len: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO, sequence-level clipped surrogate (Zheng et al. 2025, arXiv:2507.18071; docs/gspo.md).

    ``s_i = exp(mean_{t valid}(lp_θ − lp_old))`` (the length-normalised sequence ratio), GSPO-token form
    ``s_{i,t} = sg[s_i]·exp(lp_θ[t] − sg[lp_θ[t]])`` (value s_i, gradient ``s_i·∇lp_θ[t]``), and
    ``L = agg_t max(−Â_{i,t}·s_{i,t}, −Â_{i,t}·clip(s_{i,t}, 1−ε_l, 1+ε_h))``. With one advantage per sequence and the
    default ``seq_mean_token_mean`` this equals GSPO's ``−(1/G) Σ_i min(s_i Â_i, clip(s_i) Â_i)`` in value and gradient.
    The clip applies to whole sequences. Defaults ε_l = 3e-4, ε_h = 4e-4 (paper).

    Shapes: logp, logp_old, mask (B, T); advantages (B,) or (B, T). Metrics as :func:`ppo_policy_loss`
    (clipfrac counts clipped tokens, i.e. token-weighted clipped sequences; ratio_mean is over valid tokens).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(mask)  # (B, T)
    _check_shapes(mask, logp=logp, logp_old=logp_old, advantages=advantages)
    logp, logp_old, advantages = (zero_invalid(x, mask) for x in (logp, logp_old, advantages))
    seq_log_ratio = masked_mean(logp - logp_old, mask, dim=-1).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # (B,)
    token_log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()  # (B, T); value s_i, grad via lp_θ[t]
    ratio = torch.exp(token_log_ratio)  # (B, T)
    loss_tokens, clipped, _ = _clipped_surrogate(ratio, advantages.detach(), clip_low, clip_high, None)
    loss = aggregate(loss_tokens, mask, agg, norm_len, global_tokens, global_seqs)
    with torch.no_grad():
        metrics = {
            "policy/clipfrac": masked_mean(clipped.float(), mask),
            "policy/approx_kl": masked_mean(kl_k3(logp_old, logp), mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def vanilla_pg_loss(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    agg: str = "seq_mean_token_sum",
    norm_len: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE without clipping (Williams 1992): ``L = −agg_t Â_t·lp_θ[t]``.

    With sequence advantages and the default ``seq_mean_token_sum`` this is RLOO's ``−mean_i A_i·LP_θ(y_i)``
    (Ahmadian et al. 2024) and the original ReMax loss. Shapes: logp, mask (B, T); advantages (B,) or (B, T).
    Metrics: ``policy/pg_advantage_mean`` over valid tokens.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(mask)  # (B, T)
    _check_shapes(mask, logp=logp, advantages=advantages)
    logp, advantages = zero_invalid(logp, mask), zero_invalid(advantages, mask)
    loss = aggregate(-advantages.detach() * logp, mask, agg, norm_len, global_tokens, global_seqs)
    return loss, {"policy/pg_advantage_mean": masked_mean(advantages.detach(), mask)}


def value_loss(
    values: Tensor,
    values_old: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = 0.2,
    agg: str = "token_mean",
    norm_len: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO as in InstructGPT / PPO-max; docs/ppo.md).

    ``V^c = clip(V, V_old − ε_v, V_old + ε_v)``, ``L_V = ½·agg_t max((V − G)², (V^c − G)²)``; ``clip=None`` gives
    the plain ``½·agg (V − G)²``. Shapes: values (B, T) with gradient; values_old, returns, mask (B, T).
    Metrics: ``critic/value_loss``, ``critic/clipfrac`` (tokens where the clipped term is the larger),
    ``critic/value_mean``.
    """
    _check_shapes(mask, values=values, values_old=values_old, returns=returns)
    values, values_old, returns = (zero_invalid(x, mask) for x in (values, values_old, returns.detach()))
    err = (values - returns) ** 2  # (B, T)
    clipped = torch.zeros_like(mask, dtype=torch.bool)
    if clip is not None:
        v_clip = values_old.detach() + (values - values_old.detach()).clamp(-clip, clip)  # (B, T)
        err_clip = (v_clip - returns) ** 2
        clipped = err_clip > err
        err = torch.maximum(err, err_clip)
    loss = 0.5 * aggregate(err, mask, agg, norm_len, global_tokens, global_seqs)
    with torch.no_grad():
        metrics = {
            "critic/value_loss": loss.detach(),
            "critic/clipfrac": masked_mean(clipped.float(), mask),
            "critic/value_mean": masked_mean(values, mask),
        }
    return loss, metrics


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-token entropy ``H = −Σ_v p_v log p_v`` of ``softmax(logits)``: (B, T, V) -> (B, T)."""
    entropy: Tensor = torch.distributions.Categorical(logits=logits.float()).entropy()  # type: ignore[no-untyped-call]
    return entropy


def entropy_bonus(
    entropy: Tensor,
    mask: Tensor,
    target: float | None = None,
    agg: str = "token_mean",
    norm_len: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Entropy term to *add* to the loss with coefficient c_H: ``−agg_t H_t`` (maximises entropy).

    With ``target`` set, PPO-max's entropy clip (Zheng et al. 2023, "Secrets of RLHF I"): ``agg_t |H_t − target|``
    (pulls the entropy towards the target, 35 in their code). Shapes: entropy, mask (B, T) (see
    :func:`entropy_from_logits`). Metrics: ``policy/entropy`` (aggregated H).
    """
    _check_shapes(mask, entropy=entropy)
    entropy = zero_invalid(entropy, mask)
    mean_entropy = aggregate(entropy, mask, agg, norm_len, global_tokens, global_seqs)
    if target is None:
        loss = -mean_entropy
    else:
        loss = aggregate((entropy - target).abs(), mask, agg, norm_len, global_tokens, global_seqs)
    return loss, {"policy/entropy": mean_entropy.detach()}


POLICY_LOSSES = {"ppo": ppo_policy_loss, "gspo": gspo_policy_loss, "vanilla_pg": vanilla_pg_loss}
