"""Reward-model losses, ensemble aggregation and calibration: pure functions.

Conventions: ``chosen``/``rejected`` are scores of shape (B,) or (B, k) for k ensemble heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bt_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, reduction: str = "mean"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss with an optional margin (Llama 2; docs/reward_models.md).

        L = -log sigma(r_c - r_r - m) = softplus(-(r_c - r_r - m))

    chosen, rejected: (B,) or (B, k) (k heads, each trained on the same pairs; the loss averages over heads).
    margin: (B,) or None. reduction: "mean" over rows (and heads) or "none" -> (B,) averaged over heads.
    Metrics: ``reward/accuracy`` (r_c > r_r), ``reward/margin`` (mean r_c - r_r).
    """
    diff = chosen - rejected  # (B,) or (B, k)
    m = torch.zeros_like(diff) if margin is None else margin.to(diff.dtype)
    if diff.dim() == 2 and m.dim() == 1:
        m = m[:, None]  # (B, 1) broadcast over heads
    per = F.softplus(-(diff - m))
    per = per.mean(-1) if per.dim() == 2 else per  # (B,)
    metrics = {"reward/accuracy": (diff > 0).float().mean().item(), "reward/margin": diff.mean().item()}
    return (per.mean() if reduction == "mean" else per), metrics


def regression_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean squared error over rated attributes (multi-objective reward head, ArmoRM stage 1).

    pred, target: (B, K); mask: (B, K) with 1 where the attribute is rated (missing ratings are ignored).
    "mean" divides by the number of rated entries; "none" returns the per-row sum (B,) for callers that
    normalise across micro-batches themselves.
    """
    mask = torch.ones_like(target) if mask is None else mask.to(target.dtype)
    sq = (pred - target) ** 2 * mask  # (B, K)
    loss = sq.sum() / mask.sum().clamp(min=1) if reduction == "mean" else sq.sum(-1)
    return loss, {"reward/mse": (sq.sum() / mask.sum().clamp(min=1)).item()}


def ensemble_mean(scores: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    """R_mean = (1/k) sum_i R_i.  scores: (B, k) -> (B,)."""
    return scores.mean(-1)


def ensemble_min(scores: torch.Tensor, lam: float = 0.0) -> torch.Tensor:
    """Worst-case optimisation (WCO): R = min_i R_i.  (B, k) -> (B,)."""
    return scores.min(-1).values


def ensemble_uwo(scores: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Uncertainty-weighted optimisation (Coste et al. 2024): R = mean - lambda * population variance.

    (B, k) -> (B,). The paper penalises the variance across members (not the std): Var = (1/k) sum (R_i - mean)^2.
    """
    return scores.mean(-1) - lam * scores.var(-1, unbiased=False)


def ensemble_brme(scores: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """Reward-robust objective of BRME (Yan et al. 2024): R = lam * nominal + (1 - lam) * worst case.

    (B, k) -> (B,). The nominal reward is the ensemble mean (our members carry no per-head std, so the paper's
    "most confident head" is not available; docs/reward_models.md), the worst case is min_i R_i. lam = 1 gives
    ``mean``, lam = 0 gives ``min``; values outside [0, 1] are an error.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"brme lambda must lie in [0, 1] (the weight of the nominal reward), got {lam}")
    return lam * scores.mean(-1) + (1.0 - lam) * scores.min(-1).values


ENSEMBLE_AGGREGATIONS = {"mean": ensemble_mean, "min": ensemble_min, "uwo": ensemble_uwo, "brme": ensemble_brme}


def aggregate(scores: torch.Tensor, mode: str = "mean", lam: float = 0.5) -> torch.Tensor:
    """Combine (B, k) ensemble scores with a named aggregation; (B,) passes through."""
    if scores.dim() == 1:
        return scores
    if mode not in ENSEMBLE_AGGREGATIONS:
        raise ValueError(f"unknown ensemble aggregation {mode!r}; choose one of {sorted(ENSEMBLE_AGGREGATIONS)}")
    return ENSEMBLE_AGGREGATIONS[mode](scores, lam)


def calibration_error(diff: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error of P(chosen > rejected) = sigma(r_c - r_r) against the labels.

    The label of every pair is "chosen wins". For each pair the prediction is the more likely side with
    confidence c = max(p, 1 - p) and it is correct when p > 0.5. ECE = sum_b (n_b / N) |acc_b - conf_b| over
    equal-width confidence bins on [0.5, 1].  diff: (N,).
    """
    p = torch.sigmoid(diff.detach().float())
    conf = torch.maximum(p, 1 - p)
    correct = (p > 0.5).float()
    edges = torch.linspace(0.5, 1.0, n_bins + 1)
    idx = torch.bucketize(conf, edges[1:-1], right=True)  # (N,) bin per pair
    ece = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            ece += sel.float().mean().item() * abs(correct[sel].mean().item() - conf[sel].mean().item())
    return ece


REWARD_LOSSES = {"bt": bt_loss, "regression": regression_loss}
