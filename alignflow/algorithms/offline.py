"""Offline and "supervised" RL pieces that are pure maths: A-LoL, SuperHF's loss and MPO's easy/hard split.

Formulas and defaults: docs/alol.md, docs/superhf.md, docs/mpo.md. Losses return ``(loss, metrics)`` like the
preference losses (metrics are detached 0-d tensors); the dataflow around them (sampling, value fitting, the PPO stage
of MPO) lives in trainers and recipes. ``OFFLINE_LOSSES`` at the end lists the losses; their call conventions differ
(documented per function) because their inputs do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alignflow.algorithms.core import aggregate, masked_mean, masked_sum
from alignflow.algorithms.preference import reduce_rows, weighted_mean

ALOL_VARIANTS = ("alol", "seq", "ref_free", "kl")


# ----------------------------------------------------------------------------------------------- A-LoL
def alol_advantages(rewards: Tensor, values: Tensor) -> Tensor:
    """A-LoL sequence advantage ``A = R(x, y) - V_ref(x)``; rewards, values (B,) -> (B,), detached.

    V_ref is the reference policy's value estimate (an MLP on π_ref's prompt hidden state fit to the rewards of
    π_ref's samples). For R-LoL pass the rewards themselves as the advantages of :func:`alol_loss`.
    """
    if rewards.shape != values.shape:
        raise ValueError(f"alol_advantages: rewards {tuple(rewards.shape)} and values {tuple(values.shape)} differ")
    return (rewards - values).detach()


def alol_keep_mask(advantages: Tensor) -> Tensor:
    """Negative-advantage filtering: (B,) bool, True where A > 0 (A-LoL trains only on these rows)."""
    return advantages > 0


def alol_sampling_weights(advantages: Tensor) -> Tensor:
    """ "good_priority" sampling: probabilities ∝ A⁺ = max(A, 0), (B,) -> (B,) summing to 1."""
    pos = advantages.detach().clamp_min(0.0)
    total = pos.sum()
    if not bool(total > 0):
        raise ValueError("alol_sampling_weights: no row has a positive advantage; nothing to sample")
    return pos / total


def _alol_per_row(
    logp: Tensor, ref_logp: Tensor | None, mask: Tensor, adv: Tensor, variant: str, clip: float, kl_beta: float
) -> tuple[Tensor, Tensor]:
    """Per-row A-LoL loss (B,) and the importance weights used, (B,) or (B, T), for the metrics."""
    nll = -masked_sum(logp, mask, dim=-1)  # (B,)
    low, high = math.log(1.0 - clip) if clip < 1.0 else -math.inf, math.log(1.0 + clip)
    if variant == "ref_free":
        return adv * nll, torch.ones_like(nll)
    assert ref_logp is not None, "alol_loss checks that every variant but ref_free has ref_logp"
    log_ratio = torch.where(mask, logp - ref_logp, 0.0)  # (B, T)
    if variant == "alol":
        w = log_ratio.sum(dim=-1).clamp(low, high).exp().detach()  # (B,)
        return adv * w * nll, w
    if variant == "seq":
        w_tok = log_ratio.clamp(low, high).exp().detach()  # (B, T)
        return adv * -masked_sum(w_tok * logp, mask, dim=-1), w_tok
    # "kl": w = 1 plus β·(LP_θ - LP_ref)
    return adv * nll + kl_beta * log_ratio.sum(dim=-1), torch.ones_like(nll)


def alol_loss(
    logp: Tensor,
    ref_logp: Tensor | None,
    mask: Tensor,
    advantages: Tensor,
    *,
    variant: str = "alol",
    clip: float = 0.9,
    kl_beta: float = 0.2,
    filter_negative: bool = True,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A-LoL (Baheti et al. 2023, "Leftover Lunch"): offline policy gradient on fixed data.

    Per row with A > 0 (rows with A <= 0 are discarded when ``filter_negative``; the metrics count them):

    * ``"alol"``: ``A·w·NLL_sum(y)``, w = sg[clip(π_θ(y|x)/π_ref(y|x), 1 - c, 1 + c)] on the sequence ratio;
    * ``"seq"`` (A-LoL seq): ``A·Σ_t w_t·(-lp_θ[t])`` with per-token clipped ratios w_t = sg[clip(ρ_t, 1-c, 1+c)];
    * ``"ref_free"``: w = 1;
    * ``"kl"`` (A-LoL KL): ``A·NLL_sum(y) + β·(LP_θ(y) - LP_ref(y))``, β = ``kl_beta`` = 0.2 (README).

    c = ``clip`` = 0.9 (w ∈ [0.1, 1.9]), c >= 0. R-LoL: pass the rewards as ``advantages``.
    Shapes: ``logp`` (policy), ``ref_logp`` (None allowed for ``ref_free``) and ``mask`` (B, T); ``advantages`` (B,),
    detached. ``reduction="mean"`` averages over the kept rows (weighted by ``weights``); for gradient accumulation
    use ``"sum"`` and divide by the number of kept rows in the whole mini-batch.
    With π_θ = π_ref, w = 1 and the loss is the advantage-weighted NLL of the positive-advantage rows.
    Metrics: ``alol/kept_fraction``, ``alol/advantage`` (mean kept A), ``alol/importance_weight`` (mean w),
    ``alol/clipfrac`` (fraction of weights at a clip bound), ``alol/nll`` (mean kept NLL_sum).
    """
    if variant not in ALOL_VARIANTS:
        raise ValueError(f"alol_loss: variant={variant!r} is not one of {', '.join(ALOL_VARIANTS)}")
    if clip < 0:
        raise ValueError(f"alol_loss: clip={clip} must be >= 0")
    if variant != "ref_free" and ref_logp is None:
        raise ValueError(f"alol_loss: variant {variant!r} needs ref_logp (B, T); only 'ref_free' does not")
    for name, t in (("ref_logp", ref_logp), ("mask", mask)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"alol_loss: {name} has shape {tuple(t.shape)}, expected {tuple(logp.shape)} like logp")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"alol_loss: advantages has shape {tuple(advantages.shape)}, expected ({logp.shape[0]},)")
    mask = mask.bool()
    adv = advantages.detach().to(logp.dtype)
    keep = (adv > 0) if filter_negative else torch.ones_like(adv, dtype=torch.bool)  # (B,)
    per_row, w = _alol_per_row(logp, ref_logp, mask, adv, variant, clip, kl_beta)
    per_row = torch.where(keep, per_row, 0.0)
    row_w = keep.to(logp.dtype) if weights is None else weights * keep  # (B,)
    clipped = ((w - 1.0).abs() >= clip - 1e-6) if variant in ("alol", "seq") else torch.zeros_like(w, dtype=torch.bool)
    if w.dim() == 2:  # per-token weights -> per-row means, (B,)
        w, clipped = masked_mean(w, mask, dim=-1), masked_mean(clipped.to(logp.dtype), mask, dim=-1)
    metrics = {
        "alol/kept_fraction": weighted_mean(keep.float(), weights),
        "alol/advantage": weighted_mean(adv, row_w),
        "alol/importance_weight": weighted_mean(w, row_w),
        "alol/clipfrac": weighted_mean(clipped.float(), row_w),
        "alol/nll": weighted_mean(-masked_sum(logp, mask, dim=-1), row_w),
    }
    return reduce_rows(per_row, reduction, row_w if reduction == "mean" else weights), metrics


# ----------------------------------------------------------------------------------------------- SuperHF
def superhf_select(rewards: Tensor, k: int = 1) -> Tensor:
    """SuperHF filtering: indices (P, k) of the k highest-reward completions per prompt; rewards (P, n)."""
    if rewards.dim() != 2 or not 1 <= k <= rewards.shape[1]:
        raise ValueError(f"superhf_select: rewards must be (P, n) with 1 <= k <= n; got {tuple(rewards.shape)}, k={k}")
    return rewards.topk(k, dim=1).indices


def superhf_loss(
    policy_logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.35,
    agg: str = "token_mean",
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SuperHF (Mukobi et al. 2023) update on the kept best-of-n completions y*.

    ``L = CE(y*) + β·max(0, KL_tok(π_0 ‖ π_θ))`` with the full-vocabulary forward KL per token
    ``Σ_v π_0(v)·[log π_0(v) - log π_θ(v)]`` averaged over completion tokens, π_0 the frozen prior (reference).
    β = 0.35 (lr 2e-5, LoRA r = 4, 2 prompts × 16 samples per update, top-1 kept, in the paper).
    Shapes: logits (B, T, V) already aligned with ``labels`` (B, T) (logits[:, t] predicts labels[:, t]);
    ``mask`` (B, T) marks completion tokens. CE and KL are reduced with
    :func:`~alignflow.algorithms.core.aggregate` (``agg``, ``global_tokens``/``global_seqs`` for accumulation).
    β = 0 is SFT (cross-entropy) on the kept samples. Metrics: ``superhf/ce``, ``superhf/kl`` (token means).
    """
    if policy_logits.shape != ref_logits.shape or policy_logits.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(
            f"superhf_loss: shapes disagree: policy_logits {tuple(policy_logits.shape)}, ref_logits "
            f"{tuple(ref_logits.shape)}, labels {tuple(labels.shape)}, mask {tuple(mask.shape)}"
        )
    mask = mask.bool()
    logp = F.log_softmax(policy_logits.float(), dim=-1)  # (B, T, V)
    logp0 = F.log_softmax(ref_logits.detach().float(), dim=-1)  # (B, T, V)
    ce_tok = -logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    kl_tok = (logp0.exp() * (logp0 - logp)).sum(dim=-1)  # (B, T)
    kw = {"global_tokens": global_tokens, "global_seqs": global_seqs}
    ce, kl = aggregate(ce_tok, mask, agg, **kw), aggregate(kl_tok, mask, agg, **kw)
    loss = ce + beta * kl.clamp_min(0.0)
    metrics = {"superhf/ce": masked_mean(ce_tok, mask).detach(), "superhf/kl": masked_mean(kl_tok, mask).detach()}
    return loss, metrics


# ----------------------------------------------------------------------------------------------- MPO
def mpo_split(chosen_rewards: Tensor, rejected_rewards: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """MPO (Gou & Nguyen 2024) data split by reward gap: easy = |r(y_w) - r(y_l)| > δ, hard = the rest.

    Inputs (B,) RM scores; returns two (B,) bool masks. Stage 1 runs DPO on the easy pairs (ref = SFT); stage 2 runs
    PPO on the hard pairs' prompts with the DPO model as initial policy and KL reference. δ is a tuned threshold
    (**value unverified**, no default); δ = -inf puts every pair in the easy set (DPO then PPO on nothing).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"mpo_split: chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
            f"{tuple(rejected_rewards.shape)} differ"
        )
    easy = (chosen_rewards - rejected_rewards).abs() > delta  # (B,)
    return easy, ~easy


OFFLINE_LOSSES = {
    "alol": alol_loss,
    "superhf": superhf_loss,
}
