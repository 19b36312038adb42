"""Preference losses (DPO and its family) as pure tensor functions.

Each loss's formula, defaults and their sources are on its page, docs/<loss>.md (INPO, REFUEL and APO: in
docs/preference.md and docs/online_po.md). Notation as in docs/preference.md:
``LP(y)`` is a response's summed token log-prob, ``LP̄(y) = LP(y)/|y|``, ``ℓ(z) = -log σ(z) = softplus(-z)`` and
``h = [LP_θ(y_w) - LP_ref(y_w)] - [LP_θ(y_l) - LP_ref(y_l)]``.

Uniform call convention (one trainer can call any loss by name; the table of losses, one ``LossSpec`` row each,
is ``PREFERENCE_LOSSES`` in :mod:`alignflow.algorithms.preference_table`)::

    loss, metrics = PREFERENCE_LOSSES[name].fn(inputs, reduction="mean", weights=None, **hyper_params)

* ``inputs`` is a :class:`PrefInputs`; each loss reads only the fields it needs (its row's ``inputs`` lists them
  for the default hyper-parameters) and raises a ``ValueError`` naming the loss and the missing field otherwise.
* ``hyper_params`` are keyword-only, with the paper defaults quoted in each docstring.
* ``reduction``: ``"mean"`` (default) is ``Σ_i w_i l_i / Σ_i w_i`` (a plain mean over the B rows when ``weights`` is
  None), ``"sum"`` is ``Σ_i w_i l_i`` and ``"none"`` returns the (B,) vector ``w_i l_i``.
  For gradient accumulation the mean over a mini-batch of N rows split into micro-batches must not depend on
  the split: call each micro-batch with ``reduction="sum"`` and divide by N (or pass ``weights = 1/N``), never
  average micro-batch means of unequal sizes. ``weights`` (B,) are non-negative row weights (0 masks a row).
* ``metrics`` maps fixed names to detached 0-d tensors (call ``.item()`` when logging, so that a loss never forces a
  device sync). Pairwise losses report ``pref/accuracy`` (fraction of rows whose implicit chosen reward beats the
  rejected one), ``pref/margin`` (mean argument z of the loss, e.g. βh for DPO), ``pref/chosen_reward`` and
  ``pref/rejected_reward`` (mean implicit rewards, e.g. β·[LP_θ - LP_ref]); metrics are weighted like the loss.

APO is not a loss: :func:`apo_extrapolate` builds the next round's reference log-probs for iterative DPO.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from alignflow.algorithms.core import masked_sum

Metrics = dict[str, Tensor]  # fixed names -> detached 0-d tensors
LossOut = tuple[Tensor, Metrics]  # (loss, metrics), what every loss below returns

REDUCTIONS = ("mean", "sum", "none")

# name -> (ndim, aligned with the batch's B rows, description) ; used for validation and error messages
_FIELDS = {
    "policy_chosen_logps": (1, True, "(B,) LP_θ(y_w), summed token log-probs of the chosen response"),
    "policy_rejected_logps": (1, True, "(B,) LP_θ(y_l) of the rejected response"),
    "ref_chosen_logps": (1, True, "(B,) LP_ref(y_w) under the frozen reference"),
    "ref_rejected_logps": (1, True, "(B,) LP_ref(y_l) under the frozen reference"),
    "chosen_lengths": (1, True, "(B,) number of response tokens |y_w| (>= 1)"),
    "rejected_lengths": (1, True, "(B,) number of response tokens |y_l| (>= 1)"),
    "chosen_rewards": (1, True, "(B,) scalar score of the first response (RM score or Q-hat)"),
    "rejected_rewards": (1, True, "(B,) scalar score of the second response"),
    "prev_chosen_logps": (1, True, "(B,) LP_{π_t}(y_w) under the previous iterate (INPO)"),
    "prev_rejected_logps": (1, True, "(B,) LP_{π_t}(y_l) under the previous iterate (INPO)"),
    "policy_chosen_token_logps": (2, True, "(B, T) per-token lp_θ of the chosen response"),
    "policy_rejected_token_logps": (2, True, "(B, T) per-token lp_θ of the rejected response"),
    "chosen_token_rewards": (2, True, "(B, T) token rewards r̂_t of the chosen response (T-REG)"),
    "rejected_token_rewards": (2, True, "(B, T) token rewards r̂_t of the rejected response (T-REG)"),
    "chosen_mask": (2, True, "(B, T) 1 on the chosen response's tokens"),
    "rejected_mask": (2, True, "(B, T) 1 on the rejected response's tokens"),
    "policy_logps": (1, True, "(B,) LP_θ(y) of unpaired completions (KTO)"),
    "ref_logps": (1, True, "(B,) LP_ref(y) of unpaired completions (KTO)"),
    "desirable": (1, True, "(B,) bool, True where the completion is desirable (KTO)"),
    "policy_kl_logps": (1, False, "(B',) LP_θ(y'|x) of mismatched pairs for KTO's z_0"),
    "ref_kl_logps": (1, False, "(B',) LP_ref(y'|x) of mismatched pairs for KTO's z_0"),
    "ranked_logps": (2, True, "(B, n) LP_θ of n ranked responses, best first"),
    "ranked_lengths": (2, True, "(B, n) token counts of the ranked responses"),
    "ranked_rewards": (2, True, "(B, n) scores of the ranked responses (optional for PRO)"),
    "ranked_mask": (2, True, "(B, n) bool, True for real responses (valid ones first, >= 2 per row)"),
    "user_conditioned": (1, True, "(B,) 1 where the row is after its user's conditioning, 0 the generic (P-DPO)"),
}


@dataclasses.dataclass
class PrefInputs:
    """Everything a preference loss may read; unused fields stay None. Shapes in ``_FIELDS`` (B rows).

    Pairwise losses read the chosen/rejected fields; KTO reads the unpaired ``policy_logps``/``ref_logps``/
    ``desirable`` (+ the mismatched-pair ``*_kl_logps``); PRO and CPL read ``ranked_*`` when present and otherwise
    treat (chosen, rejected) as a ranked list of two (see :meth:`as_ranked`).
    """

    policy_chosen_logps: Tensor | None = None
    policy_rejected_logps: Tensor | None = None
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    chosen_rewards: Tensor | None = None
    rejected_rewards: Tensor | None = None
    prev_chosen_logps: Tensor | None = None
    prev_rejected_logps: Tensor | None = None
    policy_chosen_token_logps: Tensor | None = None
    policy_rejected_token_logps: Tensor | None = None
    chosen_token_rewards: Tensor | None = None
    rejected_token_rewards: Tensor | None = None
    chosen_mask: Tensor | None = None
    rejected_mask: Tensor | None = None
    policy_logps: Tensor | None = None
    ref_logps: Tensor | None = None
    desirable: Tensor | None = None
    policy_kl_logps: Tensor | None = None
    ref_kl_logps: Tensor | None = None
    ranked_logps: Tensor | None = None
    ranked_lengths: Tensor | None = None
    ranked_rewards: Tensor | None = None
    ranked_mask: Tensor | None = None
    user_conditioned: Tensor | None = None

    def need(self, loss: str, *names: str) -> list[Tensor]:
        """Return the named fields, or raise naming the loss, the field and its expected shape."""
        out, rows = [], None
        for name in names:
            ndim, aligned, doc = _FIELDS[name]
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"{loss}: PrefInputs.{name} is required but is None; expected {doc}")
            if not torch.is_tensor(value) or value.dim() != ndim:
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"{loss}: PrefInputs.{name} should be {doc}; got {got}")
            if aligned:
                if rows is not None and value.shape[0] != rows[1]:
                    raise ValueError(
                        f"{loss}: PrefInputs.{name} has {value.shape[0]} rows but PrefInputs.{rows[0]} has {rows[1]}"
                    )
                rows = rows or (name, value.shape[0])
            if name.endswith("lengths"):
                _check_lengths(loss, name, value, self.ranked_mask if name == "ranked_lengths" else None)
            out.append(value)
        return out

    def as_ranked(self, loss: str, need_lengths: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """(logps (B, n), lengths (B, n) or None, rewards (B, n) or None, mask (B, n) bool).

        Uses the ``ranked_*`` fields when ``ranked_logps`` is set, else stacks (chosen, rejected) as n = 2 with
        ``chosen_rewards``/``rejected_rewards`` as scores when both are set.
        """
        if self.ranked_logps is not None:
            names = ["ranked_logps"] + [
                n
                for n, want in (
                    ("ranked_mask", self.ranked_mask is not None),
                    ("ranked_lengths", need_lengths),
                    ("ranked_rewards", self.ranked_rewards is not None),
                )
                if want
            ]
            got = dict(zip(names, self.need(loss, *names), strict=False))
            logps = got["ranked_logps"]  # (B, n)
            for name, value in got.items():
                if value.shape != logps.shape:
                    raise ValueError(
                        f"{loss}: PrefInputs.{name} has shape {tuple(value.shape)} but ranked_logps has "
                        f"{tuple(logps.shape)}"
                    )
            mask = got["ranked_mask"].bool() if "ranked_mask" in got else torch.ones_like(logps, dtype=torch.bool)
            _check_ranked_mask(loss, mask)
            return logps, got.get("ranked_lengths"), got.get("ranked_rewards"), mask
        logps = torch.stack(self.need(loss, "policy_chosen_logps", "policy_rejected_logps"), dim=1)  # (B, 2)
        lengths = None
        if need_lengths:
            lengths = torch.stack(self.need(loss, "chosen_lengths", "rejected_lengths"), dim=1)  # (B, 2)
        rewards = None
        if self.chosen_rewards is not None and self.rejected_rewards is not None:
            rewards = torch.stack(self.need(loss, "chosen_rewards", "rejected_rewards"), dim=1)  # (B, 2)
        return logps, lengths, rewards, torch.ones_like(logps, dtype=torch.bool)


def _check_lengths(loss: str, name: str, lengths: Tensor, mask: Tensor | None) -> None:
    bad = lengths < 1
    if mask is not None and mask.shape == lengths.shape:
        bad = bad & mask.bool()
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{loss}: PrefInputs.{name} row {row} has a response of length "
            f"{lengths[row].tolist()}; every response needs at least one token"
        )


def _check_ranked_mask(loss: str, mask: Tensor) -> None:
    counts = mask.sum(dim=1)  # (B,)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < counts[:, None]  # (B, n)
    bad = (counts < 2) | (prefix != mask).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{loss}: PrefInputs.ranked_mask row {row} is {mask[row].int().tolist()}; each row needs "
            f">= 2 responses, valid ones first"
        )


def _check_range(loss: str, name: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    if not (low <= value <= high) or (high_open and value == high):
        raise ValueError(f"{loss}: {name}={value} is outside [{low}, {high}{')' if high_open else ']'}")


def reduce_rows(losses: Tensor, reduction: str, weights: Tensor | None) -> Tensor:
    """Apply the row weights and the reduction (see the module docstring). ``losses``: (B,)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if weights is not None:
        if weights.shape != losses.shape:
            raise ValueError(f"weights has shape {tuple(weights.shape)}, expected {tuple(losses.shape)} (one per row)")
        losses = losses * weights
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    denom = weights.sum().clamp_min(1e-12) if weights is not None else max(losses.numel(), 1)
    return losses.sum() / denom


def weighted_mean(x: Tensor, weights: Tensor | None) -> Tensor:
    """Detached (weighted) mean of a (B,) metric."""
    x = x.detach().float()
    if weights is None:
        return x.mean() if x.numel() else x.new_zeros(())
    w = weights.detach().float()
    return (x * w).sum() / w.sum().clamp_min(1e-12)


def _pair_metrics(chosen: Tensor, rejected: Tensor, margin: Tensor, weights: Tensor | None) -> Metrics:
    return {
        "pref/accuracy": weighted_mean((chosen > rejected).float(), weights),
        "pref/margin": weighted_mean(margin, weights),
        "pref/chosen_reward": weighted_mean(chosen, weights),
        "pref/rejected_reward": weighted_mean(rejected, weights),
    }


def _log_ratios(inputs: PrefInputs, loss: str, length_normalize: bool = False) -> tuple[Tensor, Tensor]:
    """(LP_θ(y_w) - LP_ref(y_w), LP_θ(y_l) - LP_ref(y_l)), each (B,), optionally divided by the lengths."""
    pc, pr, rc, rr = inputs.need(
        loss, "policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"
    )
    chosen, rejected = pc - rc, pr - rr  # (B,), (B,)
    if length_normalize:
        lc, lr = inputs.need(loss, "policy_chosen_logps", "chosen_lengths", "rejected_lengths")[1:]
        chosen, rejected = chosen / lc, rejected / lr
    return chosen, rejected


def _smoothed(z: Tensor, eps: float) -> Tensor:
    """(1 - ε)ℓ(z) + εℓ(-z), per row."""
    return (1.0 - eps) * F.softplus(-z) + eps * F.softplus(z)


# ----------------------------------------------------------------------------------------------- pairwise
def dpo_loss(
    inputs: PrefInputs,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> LossOut:
    """DPO (Rafailov et al. 2023) and conservative DPO (cDPO, label smoothing ε).

    ``l_i = (1 - ε)·ℓ(βh_i) + ε·ℓ(-βh_i)``; ε = 0 is plain DPO. β = 0.1; ε ∈ [0, 0.5] (TRL default 0; ≈ 0.1 in
    cDPO). The cDPO optimum is finite: σ(βh*) = 1 - ε. At init (π = π_ref) the loss is log 2 and the gradient
    weight σ(-βh) = 0.5.
    Reads policy/ref chosen/rejected log-probs, each (B,). Rewards: β·(LP_θ - LP_ref); margin βh.
    """
    _check_range("dpo_loss", "label_smoothing", label_smoothing, 0.0, 0.5)
    chosen, rejected = _log_ratios(inputs, "dpo_loss")  # (B,), (B,)
    z = beta * (chosen - rejected)  # (B,)
    losses = _smoothed(z, label_smoothing)
    return reduce_rows(losses, reduction, weights), _pair_metrics(beta * chosen, beta * rejected, z, weights)


def cdpo_loss(
    inputs: PrefInputs,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> LossOut:
    """Conservative DPO: :func:`dpo_loss` with the cDPO default ε = 0.1 (same formula, shapes and metrics)."""
    return dpo_loss(inputs, beta=beta, label_smoothing=label_smoothing, reduction=reduction, weights=weights)


def robust_dpo_loss(
    inputs: PrefInputs,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> LossOut:
    """Robust DPO (Chowdhury et al. 2024): unbiased under label flips with rate ε.

    ``l_i = [(1 - ε)·ℓ(βh_i) - ε·ℓ(-βh_i)] / (1 - 2ε)``, ε ∈ [0, 0.5) the assumed flip rate (default 0.1, an
    assumption to set per data set). ε = 0 gives DPO; at init the loss is log 2. Shapes and metrics as DPO.
    """
    eps = label_smoothing
    _check_range("robust_dpo_loss", "label_smoothing", eps, 0.0, 0.5, high_open=True)
    chosen, rejected = _log_ratios(inputs, "robust_dpo_loss")  # (B,), (B,)
    z = beta * (chosen - rejected)  # (B,)
    losses = ((1.0 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1.0 - 2.0 * eps)
    return reduce_rows(losses, reduction, weights), _pair_metrics(beta * chosen, beta * rejected, z, weights)


def ipo_loss(
    inputs: PrefInputs,
    *,
    beta: float = 0.1,
    length_normalize: bool = True,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> LossOut:
    """IPO (Azar et al. 2023, "A general theoretical paradigm..."): ``l_i = (h_i - 1/(2τ))²`` with τ = ``beta``.

    τ = 0.1 (so the target margin is 5). With ``length_normalize`` (default, as TRL does) h is built from the
    length-averaged log-ratios [LP_θ - LP_ref]/|y| and the lengths are required; False uses summed log-probs as in
    the paper. At init the loss is 25 for τ = 0.1; h = 1/(2τ) is the fixed point (zero gradient).
    Rewards: τ·(log-ratio); margin τ·h.
    """
    chosen, rejected = _log_ratios(inputs, "ipo_loss", length_normalize)  # (B,), (B,)
    h = chosen - rejected  # (B,)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return reduce_rows(losses, reduction, weights), _pair_metrics(beta * chosen, beta * rejected, beta * h, weights)


def hinge_loss(
    inputs: PrefInputs, *, beta: float = 0.1, reduction: str = "mean", weights: Tensor | None = None
) -> LossOut:
    """SLiC-style hinge on the DPO margin: ``l_i = max(0, 1 - βh_i)`` (β = 1/δ, δ the hinge margin).

    The calibration loss of SLiC-HF (Zhao et al. 2023) applied to the reference-relative
    margin, the form TRL calls ``hinge``. β = 0.1. At init the loss is 1. Shapes and metrics as DPO.
    """
    chosen, rejected = _log_ratios(inputs, "hinge_loss")  # (B,), (B,)
    z = beta * (chosen - rejected)  # (B,)
    losses = torch.relu(1.0 - z)
    return reduce_rows(losses, reduction, weights), _pair_metrics(beta * chosen, beta * rejected, z, weights)


def _simpo_terms(inputs: PrefInputs, loss: str, beta: float, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    pc, pr, lc, lr = inputs.need(
        loss, "policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths"
    )
    chosen, rejected = beta * pc / lc, beta * pr / lr  # (B,), (B,)
    return chosen, rejected, chosen - rejected - gamma


def simpo_loss(
    inputs: PrefInputs,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> LossOut:
    """SimPO (Meng et al. 2024), reference-free: ``l_i = ℓ(β·LP̄_θ(y_w) - β·LP̄_θ(y_l) - γ)``.

    β = 2.0-2.5 and γ/β = 0.5 in the paper, so defaults β = 2.0, γ = 1.0 (lr 3e-7 to 1e-6). Optional label
    smoothing ε as in cDPO. γ = 0 is length-normalised DPO without a reference. Reads policy log-probs and lengths,
    each (B,). Rewards: β·LP̄_θ; margin β·ΔLP̄ - γ.
    """
    _check_range("simpo_loss", "label_smoothing", label_smoothing, 0.0, 0.5)
    chosen, rejected, z = _simpo_terms(inputs, "simpo_loss", beta, gamma)  # (B,) each
    losses = _smoothed(z, label_smoothing)
    return reduce_rows(losses, reduction, weights), _pair_metrics(chosen, rejected, z, weights)


def _log_odds(mean_logp: Tensor) -> Tensor:
    """log[P̄/(1 - P̄)] with P̄ = exp(LP̄); LP̄ is clamped to <= -1e-6 so that P̄ = 1 stays finite."""
    m = mean_logp.clamp(max=-1e-6)
    return m - torch.log(-torch.expm1(m))


def orpo_loss(
    inputs: PrefInputs, *, lam: float = 0.1, reduction: str = "mean", weights: Tensor | None = None
) -> LossOut:
    """ORPO (Hong et al. 2024), no reference: ``l_i = NLL(y_w) + λ·ℓ(log odds(y_w) - log odds(y_l))``.

    ``P̄(y) = exp(LP̄_θ(y))``, ``log odds(y) = log P̄ - log(1 - P̄)``, NLL(y_w) = -LP̄_θ(y_w) (the paper's
    token-averaged SFT term, per row). λ = 0.1. With P̄_w = P̄_l the loss is NLL + λ·log 2. Reads policy log-probs
    and lengths, each (B,). Rewards: log odds; margin: the log odds ratio. Extra: ``orpo/nll``.
    """
    pc, pr, lc, lr = inputs.need(
        "orpo_loss", "policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths"
    )
    mean_c, mean_r = pc / lc, pr / lr  # (B,), (B,)
    odds_c, odds_r = _log_odds(mean_c), _log_odds(mean_r)
    z = odds_c - odds_r  # (B,)
    losses = -mean_c + lam * F.softplus(-z)
    metrics = _pair_metrics(odds_c, odds_r, z, weights)
    metrics["orpo/nll"] = weighted_mean(-mean_c, weights)
    return reduce_rows(losses, reduction, weights), metrics


def inpo_loss(
    inputs: PrefInputs, *, eta: float = 1.0, tau: float = 0.1, reduction: str = "mean", weights: Tensor | None = None
) -> LossOut:
    """INPO (Zhang et al. 2024), one online-mirror-descent step on the preference game: ``l_i = (h_t - η/2)²``.

    ``h_t = log[π(y_w)/π(y_l)] - ητ·log[π_ref(y_w)/π_ref(y_l)] - (1 - ητ)·log[π_t(y_w)/π_t(y_l)]`` with π_t the
    previous iterate (``prev_*_logps``). η, τ values are **unverified** (not confirmed from the paper; defaults 1.0,
    0.1). ητ = 1 is IPO (summed log-probs) against π_ref with 1/(2τ_IPO) = η/2. Margin metric: h_t.
    """
    pc, pr, rc, rr, tc, tr = inputs.need(
        "inpo_loss",
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "prev_chosen_logps",
        "prev_rejected_logps",
    )
    mix = eta * tau
    chosen = pc - mix * rc - (1.0 - mix) * tc  # (B,)
    rejected = pr - mix * rr - (1.0 - mix) * tr  # (B,)
    h = chosen - rejected
    losses = (h - eta / 2.0) ** 2
    return reduce_rows(losses, reduction, weights), _pair_metrics(chosen, rejected, h, weights)


def refuel_loss(
    inputs: PrefInputs, *, eta: float = 1.0, reduction: str = "mean", weights: Tensor | None = None
) -> LossOut:
    """REFUEL (Gao et al. 2024; REBEL for one turn): ``l_i = (h_i - η·(Q̂(y) - Q̂(y')))²``.

    The "chosen"/"rejected" fields hold the two continuations y, y' (not ranked); ``ref_*`` hold the log-probs
    under the sampling iterate π_t and ``chosen_rewards``/``rejected_rewards`` hold Q̂. η = 1.0 (code default).
    Q̂(y) = Q̂(y') drives the log-ratio difference to 0. Rewards: LP_θ - LP_t; margin h.
    """
    chosen, rejected = _log_ratios(inputs, "refuel_loss")  # (B,), (B,)
    qc, qr = inputs.need("refuel_loss", "chosen_rewards", "rejected_rewards")
    h = chosen - rejected  # (B,)
    losses = (h - eta * (qc - qr)) ** 2
    return reduce_rows(losses, reduction, weights), _pair_metrics(chosen, rejected, h, weights)


def treg_token_rewards(ref_pos_token_logps: Tensor, ref_neg_token_logps: Tensor, mask: Tensor) -> Tensor:
    """T-REG self-generated token rewards: ``r̂_t = σ(lp_ref(y_t|x⁺) - lp_ref(y_t|x⁻)) - 0.5`` ∈ [-0.5, 0.5].

    Inputs (B, T): reference log-probs of the same response under the contrastive prompts x⁺ / x⁻ and the
    response mask. Returns (B, T), 0 off the mask, without gradient.
    """
    mask = mask.bool()
    diff = torch.where(mask, ref_pos_token_logps - ref_neg_token_logps, 0.0)  # (B, T)
    return torch.where(mask, torch.sigmoid(diff) - 0.5, 0.0).detach()


def treg_loss(
    inputs: PrefInputs,
    *,
    beta: float = 0.1,
    alpha: float = 0.25,
    base: str = "dpo",
    gamma: float = 1.0,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> LossOut:
    """T-REG (Zhou et al. 2024): DPO (or SimPO) plus a token-level regulariser weighted by the DPO gradient scale.

    ``L_REG(y) = -Σ_t β·r̂_t·lp_θ[t]``, ``w = sg[σ(-z)]`` (σ(-βh) for DPO), and
    ``l_i = ℓ(z_i) + α·w_i·(L_REG(y_w) + L_REG(y_l))``, z = βh (base "dpo") or SimPO's margin (base "simpo", with γ).
    α ∈ {0.1, 0.25, 0.5}. Token inputs (B, T): ``policy_*_token_logps``, ``*_token_rewards`` (see
    :func:`treg_token_rewards`), ``*_mask``; their masked sums must equal the sequence log-probs. α = 0 or r̂ ≡ 0
    is the base loss. Extra metric: ``treg/reg``.
    """
    if base == "dpo":
        chosen, rejected = _log_ratios(inputs, "treg_loss")  # (B,), (B,)
        chosen, rejected = beta * chosen, beta * rejected
        z = chosen - rejected
    elif base == "simpo":
        chosen, rejected, z = _simpo_terms(inputs, "treg_loss", beta, gamma)
    else:
        raise ValueError(f"treg_loss: base={base!r} is not one of dpo, simpo")
    lw, ll, rw, rl, mw, ml = inputs.need(
        "treg_loss",
        "policy_chosen_token_logps",
        "policy_rejected_token_logps",
        "chosen_token_rewards",
        "rejected_token_rewards",
        "chosen_mask",
        "rejected_mask",
    )
    reg_w = -beta * masked_sum(rw * lw, mw, dim=-1)  # (B,)
    reg_l = -beta * masked_sum(rl * ll, ml, dim=-1)  # (B,)
    reg = torch.sigmoid(-z).detach() * (reg_w + reg_l)  # (B,)
    losses = F.softplus(-z) + alpha * reg
    metrics = _pair_metrics(chosen, rejected, z, weights)
    metrics["treg/reg"] = weighted_mean(reg, weights)
    return reduce_rows(losses, reduction, weights), metrics


# ----------------------------------------------------------------------------------------------- unpaired
def kto_loss(
    inputs: PrefInputs,
    *,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    z0: float | None = None,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> LossOut:
    """KTO (Ethayarajh et al. 2024) on unpaired (x, y, desirable?) rows.

    ``r_θ = LP_θ(y) - LP_ref(y)``; ``z_0 = max(0, mean_j[LP_θ(y'_j|x_j) - LP_ref(y'_j|x_j)])`` over mismatched
    pairs (``policy_kl_logps``/``ref_kl_logps``, (B',)), detached. Desirable rows: ``λ_D·(1 - σ(β(r_θ - z_0)))``;
    undesirable: ``λ_U·(1 - σ(β(z_0 - r_θ)))``. β = 0.1, λ_D = λ_U = 1; keep λ_D·n_D/(λ_U·n_U) ∈ [1, 4/3].
    At init every row's loss is 0.5·λ. ``z0`` (float) overrides the in-batch estimate, e.g. one gathered across
    data-parallel ranks or accumulated over micro-batches (z_0 is a batch statistic, so it depends on the split).
    Metrics: ``pref/chosen_reward`` / ``pref/rejected_reward`` (mean β·r_θ of desirable / undesirable rows),
    ``kto/z0``, ``kto/desirable_fraction``.
    """
    pol, ref, desirable = inputs.need("kto_loss", "policy_logps", "ref_logps", "desirable")
    if desirable.dtype != torch.bool and not bool(((desirable == 0) | (desirable == 1)).all()):
        raise ValueError("kto_loss: PrefInputs.desirable must be bool or 0/1")
    d = desirable.bool()  # (B,)
    if z0 is None:
        pk, rk = inputs.need("kto_loss", "policy_kl_logps", "ref_kl_logps")
        if pk.shape != rk.shape or pk.numel() == 0:
            raise ValueError(
                f"kto_loss: policy_kl_logps {tuple(pk.shape)} and ref_kl_logps {tuple(rk.shape)} must "
                "be non-empty and of equal shape"
            )
        kl = (pk - rk).mean().detach().clamp_min(0.0)
    else:
        kl = torch.tensor(float(z0), dtype=pol.dtype, device=pol.device).clamp_min(0.0)
    r = pol - ref  # (B,)
    losses = torch.where(d, lambda_d * torch.sigmoid(-beta * (r - kl)), lambda_u * torch.sigmoid(-beta * (kl - r)))
    w = torch.ones_like(r) if weights is None else weights
    wd, wu = w * d, w * (~d)  # (B,), (B,)
    metrics = {
        "pref/chosen_reward": weighted_mean(beta * r, wd) if bool(d.any()) else r.new_zeros(()),
        "pref/rejected_reward": weighted_mean(beta * r, wu) if bool((~d).any()) else r.new_zeros(()),
        "kto/z0": kl.detach(),
        "kto/desirable_fraction": weighted_mean(d.float(), weights),
    }
    return reduce_rows(losses, reduction, weights), metrics


# ----------------------------------------------------------------------------------------------- ranked
def cpl_loss(
    inputs: PrefInputs,
    *,
    alpha: float = 0.1,
    lam: float = 0.5,
    bc_weight: float = 0.0,
    bc_data: str = "all",
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> LossOut:
    """CPL (Hejna et al. 2023): contrastive preference learning with advantage A(σ) = α·Σ_t γ^t log π(a_t|s_t).

    For LLMs a segment is a response and γ = 1, so A = α·LP_θ(y). Pair σ⁺ ≻ σ⁻: ``ℓ(A⁺ - λ·A⁻)`` with the
    conservative bias λ ∈ (0, 1]. Ranked lists (``ranked_*``, best first) average ℓ over all ordered pairs of a row
    (as the reference code does for scored segments). ``bc_weight`` adds the BC term: token-mean NLL of all the
    row's responses (``bc_data="all"``, the reference default) or of the best one (``"pos"``); it needs lengths.
    Defaults α = 0.1, λ = 0.5, bc_weight 0. λ = 1 with equal log-probs gives log 2.
    Rewards: A of the first two responses; margin: mean pair argument.
    """
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"cpl_loss: lam={lam} is outside (0, 1]")
    if bc_data not in ("all", "pos"):
        raise ValueError(f"cpl_loss: bc_data={bc_data!r} is not one of all, pos")
    logps, lengths, _, mask = inputs.as_ranked("cpl_loss", need_lengths=bc_weight > 0)  # (B, n) each
    adv = alpha * logps.masked_fill(~mask, 0.0)  # (B, n)
    z = adv[:, :, None] - lam * adv[:, None, :]  # (B, n, n): z[b, k, i] = A_k - λ A_i
    n = logps.shape[1]
    upper = torch.ones(n, n, dtype=torch.bool, device=logps.device).triu(diagonal=1)  # k < i
    pairs = upper[None] & mask[:, :, None] & mask[:, None, :]  # (B, n, n)
    count = pairs.sum(dim=(1, 2))  # (B,)
    losses = (F.softplus(-z) * pairs).sum(dim=(1, 2)) / count  # (B,)
    margin = (z * pairs).sum(dim=(1, 2)) / count  # (B,)
    if bc_weight > 0:
        losses = losses + bc_weight * _cpl_bc(logps, lengths, mask, bc_data)
    return reduce_rows(losses, reduction, weights), _pair_metrics(adv[:, 0], adv[:, 1], margin, weights)


def _cpl_bc(logps: Tensor, lengths: Tensor | None, mask: Tensor, bc_data: str) -> Tensor:
    """CPL's behaviour-cloning term per row (B,): token-mean NLL of all the row's responses ("all") or of the best
    one ("pos")."""
    assert lengths is not None, "callers ask as_ranked for lengths (need_lengths=True)"
    lp = logps.masked_fill(~mask, 0.0)
    if bc_data == "pos":
        return -lp[:, 0] / lengths[:, 0]
    return -lp.sum(dim=1) / lengths.masked_fill(~mask, 0).sum(dim=1)


def cpl_bc_loss(
    inputs: PrefInputs, *, bc_data: str = "all", reduction: str = "mean", weights: Tensor | None = None
) -> LossOut:
    """CPL-BC's pre-training phase (Hejna et al. 2023): behaviour cloning alone, the token-mean NLL of the row's
    responses (``bc_data`` as in :func:`cpl_loss`), for the first ``loss.bc_steps`` optimiser steps before the CPL
    loss takes over. Two responses of lengths 2 and 3 with summed log-probs -4 and -2 give (4 + 2) / 5 = 1.2."""
    if bc_data not in ("all", "pos"):
        raise ValueError(f"cpl_bc_loss: bc_data={bc_data!r} is not one of all, pos")
    logps, lengths, _, mask = inputs.as_ranked("cpl_bc_loss", need_lengths=True)  # (B, n) each
    losses = _cpl_bc(logps, lengths, mask, bc_data)
    return reduce_rows(losses, reduction, weights), {"cpl/bc_nll": weighted_mean(losses.detach(), weights)}


def pro_loss(
    inputs: PrefInputs, *, sft_weight: float = 0.05, reduction: str = "mean", weights: Tensor | None = None
) -> LossOut:
    """PRO (Song et al. 2023), list-wise ranking of n >= 2 responses y¹ ≻ … ≻ yⁿ (best first).

    Score s_k = LP̄_θ(y^k). For k = 1..n-1, with T_k^i = r^k - r^i (i > k) and T_k^k = max_{i>k} T_k^i:
    ``L_k = -log[exp(s_k T_k^k) / (exp(s_k T_k^k) + Σ_{i>k} exp(s_i T_k^i))]``; per row
    ``Σ_k L_k + w·(n - 1)²·NLL_sum(y¹)`` with NLL_sum = -LP_θ(y¹) and w = ``sft_weight`` = 0.05.
    Without scores (``ranked_rewards`` / ``chosen_rewards`` unset) T ≡ 1 (plain Plackett-Luce ranking).
    Rows may have different n (``ranked_mask``). n = 2 gives ℓ((r¹ - r²)(s_1 - s_2)) + 0.05·NLL_sum(y¹).
    Reads ``ranked_logps``/``ranked_lengths`` (B, n), or chosen/rejected log-probs and lengths.
    Rewards: s of the first two responses; margin s_1 - s_2. Extra metric: ``pro/rank_loss``.
    """
    logps, lengths, rewards, mask = inputs.as_ranked("pro_loss")  # (B, n) each
    assert lengths is not None  # need_lengths=True
    logps = logps.masked_fill(~mask, 0.0)
    s = logps / lengths.masked_fill(~mask, 1)  # (B, n)
    rewards = None if rewards is None else rewards.masked_fill(~mask, 0.0)
    low = torch.finfo(s.dtype).min
    rank = s.new_zeros(s.shape[0])  # (B,)
    for k in range(s.shape[1] - 1):
        rest = mask[:, k + 1 :]  # (B, n-k-1)
        active = mask[:, k] & rest.any(dim=1)  # (B,)
        # (B, n-k-1)
        temp = torch.ones_like(s[:, k + 1 :]) if rewards is None else rewards[:, k : k + 1] - rewards[:, k + 1 :]
        top = temp.masked_fill(~rest, low).amax(dim=1).masked_fill(~active, 0.0)  # (B,)
        logits = torch.cat([(s[:, k] * top)[:, None], s[:, k + 1 :] * temp], dim=1)  # (B, n-k)
        valid = torch.cat([active[:, None], rest & active[:, None]], dim=1)  # (B, n-k)
        logits = logits.masked_fill(~valid, low)
        rank = rank + torch.where(active, torch.logsumexp(logits, dim=1) - logits[:, 0], 0.0)
    n_row = mask.sum(dim=1).to(s.dtype)  # (B,)
    losses = rank + sft_weight * (n_row - 1) ** 2 * (-logps[:, 0])
    metrics = _pair_metrics(s[:, 0], s[:, 1], s[:, 0] - s[:, 1], weights)
    metrics["pro/rank_loss"] = weighted_mean(rank, weights)
    return reduce_rows(losses, reduction, weights), metrics


# ----------------------------------------------------------------------------------------------- APO
def apo_extrapolate(new_logps: Tensor, prev_logps: Tensor, alpha: float = 0.3) -> Tensor:
    """APO (He, Yuan, Gu 2024): Nesterov extrapolation of iterative DPO, in log-probability space.

    Round t solves ``π̂_{t+1} = argmin_π DPO(π; ref = π_t)``, then extrapolates
    ``log π_{t+1} = log π̂_{t+1} + α·(log π̂_{t+1} - log π̂_t) + const(x)``. The constant cancels in DPO's pairwise
    margin, so the next round's reference log-probs are ``(1 + α)·LP_{π̂_{t+1}} - α·LP_{π̂_t}`` computed from two frozen
    checkpoints: pass the result as ``ref_chosen_logps`` / ``ref_rejected_logps`` of :func:`dpo_loss`.
    Works element-wise on any shape (sequence (B,) or token (B, T) log-probs). α ≈ 0.3 over about 3 rounds
    (**unverified**); α = 0 is plain iterative DPO. Returns a detached tensor.
    """
    if new_logps.shape != prev_logps.shape:
        raise ValueError(
            f"apo_extrapolate: new_logps {tuple(new_logps.shape)} and prev_logps "
            f"{tuple(prev_logps.shape)} must have the same shape"
        )
    return ((1.0 + alpha) * new_logps - alpha * prev_logps).detach()


# ----------------------------------------------------------------------------------------------- tables
PreferenceLoss = Callable[..., LossOut]  # the call convention above; the table of losses: preference_table.py
