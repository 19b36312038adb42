"""Reward shaping: pure functions from raw reward-model scores to the reward RL optimises.

Shapes: ``r`` is (B,), the scores of the sampled responses; ``r_ref`` is (B, M), the scores of M reference
responses to the same prompt (from the SFT / reference policy, pre-computed), or (B,) for M = 1.

    par(r, r_ref)      = (1/M) sum_m sigmoid(r - r_ref_m)        Preference As Reward (Fu et al. 2025)
    centered(r, r_ref) = r - (1/M) sum_m r_ref_m
    clip(r, low, high) = min(max(r, low), high)
    minmax(r, low, high) = (r - low) / (high - low)              bounds default to the batch min / max
    tanh(r, r_ref)     = tanh(r - mean_m r_ref_m)                 (tanh(r) without r_ref)
    lsc(r, r_ref, q)   = log sigmoid(r - quantile_q(r_ref))       q = 0.85 (the 85th percentile)
    RunningNorm        (r - running mean) / running std           statistics over every reward seen so far

PAR (docs/rewards.md): the RL reward is the reward model's own Bradley-Terry probability that the sampled
response beats the reference responses. It is bounded in (0, 1), equals 0.5 when r matches the references,
grows fastest near them and saturates far above them (the paper's design principles: bounded, fast initial
growth then slow convergence, a function of the centred reward); M = 1 already works, the authors' code caps M
at 10. ``lsc`` takes the q-quantile over the M references of each row, or over all of a 1-D reference set.

``SHAPINGS`` maps names to the stateless shapings; call them with keywords through :func:`apply_shaping`,
which checks that the shaping got the reference rewards it needs. ``RunningNorm`` keeps state (save it with
``state_dict`` in the checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ref_2d(r: torch.Tensor, r_ref: torch.Tensor, name: str) -> torch.Tensor:
    """Reference rewards as (B, M), checked against r (B,)."""
    if r.dim() != 1:
        raise ValueError(f"{name}: r must be (B,), got shape {tuple(r.shape)}")
    ref = r_ref[:, None] if r_ref.dim() == 1 else r_ref  # (B, M)
    if ref.dim() != 2 or ref.shape[0] != r.shape[0] or ref.shape[1] == 0:
        raise ValueError(
            f"{name}: r_ref must be (B,) or (B, M) with B = {r.shape[0]}, M >= 1; got shape {tuple(r_ref.shape)}"
        )
    return ref.to(r.dtype)


def par(r: torch.Tensor, r_ref: torch.Tensor) -> torch.Tensor:
    """Preference As Reward: ``(1/M) sum_m sigmoid(r - r_ref_m)``. r (B,), r_ref (B, M) or (B,) -> (B,) in (0, 1).

    Fu et al. 2025, "Reward Shaping to Mitigate Reward Hacking in RLHF" (arXiv 2502.18770).
    """
    ref = _ref_2d(r, r_ref, "par")  # (B, M)
    return torch.sigmoid(r[:, None] - ref).mean(-1)  # (B,)


def centered(r: torch.Tensor, r_ref: torch.Tensor) -> torch.Tensor:
    """``r - mean_m r_ref_m``. r (B,), r_ref (B, M) or (B,) -> (B,)."""
    return r - _ref_2d(r, r_ref, "centered").mean(-1)


def clip(r: torch.Tensor, low: float | None = None, high: float | None = None) -> torch.Tensor:
    """``min(max(r, low), high)``; a missing bound does not clip. (B,) -> (B,)."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"clip: low={low} is above high={high}")
    return r.clamp(min=low, max=high)


def minmax(r: torch.Tensor, low: float | None = None, high: float | None = None, eps: float = 1e-8) -> torch.Tensor:
    """``(r - low) / (high - low)`` (in [0, 1] for r in [low, high]); low / high default to the batch min / max."""
    low = r.min() if low is None else torch.as_tensor(low, dtype=r.dtype, device=r.device)
    high = r.max() if high is None else torch.as_tensor(high, dtype=r.dtype, device=r.device)
    return (r - low) / (high - low).clamp(min=eps)


def tanh(r: torch.Tensor, r_ref: torch.Tensor | None = None) -> torch.Tensor:
    """``tanh(r - mean_m r_ref_m)``, or ``tanh(r)`` without references. (B,) -> (B,) in (-1, 1)."""
    return torch.tanh(r if r_ref is None else centered(r, r_ref))


def lsc(r: torch.Tensor, r_ref: torch.Tensor, q: float = 0.85) -> torch.Tensor:
    """Log-sigmoid centred: ``log sigmoid(r - quantile_q(r_ref))`` (<= 0).

    r_ref (B, M), or (B,) read as M = 1: the q-quantile of each row's references (linear interpolation, as
    torch.quantile); r_ref (N,) with N != B: one quantile of that whole reference set for every row.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"lsc: q must be in [0, 1], got {q}")
    if r_ref.dim() == 1 and r_ref.shape[0] != r.shape[0]:
        centre = torch.quantile(r_ref.to(r.dtype), q)  # one value for every row
    else:
        centre = torch.quantile(_ref_2d(r, r_ref, "lsc"), q, dim=-1)  # (B,)
    return F.logsigmoid(r - centre)


SHAPINGS = {"par": par, "centered": centered, "clip": clip, "minmax": minmax, "tanh": tanh, "lsc": lsc}
NEEDS_REFERENCE = {"par", "centered", "lsc"}


def apply_shaping(name: str, r: torch.Tensor, r_ref: torch.Tensor | None = None, **params) -> torch.Tensor:
    """``SHAPINGS[name](r, ...)`` with a clear error for an unknown name or missing reference rewards.

    ``params`` are the shaping's keywords (``low``/``high`` for clip and minmax, ``q`` for lsc).
    """
    if name not in SHAPINGS:
        raise ValueError(f"unknown reward shaping {name!r}; choose one of {', '.join(SHAPINGS)}")
    if name in NEEDS_REFERENCE and r_ref is None:
        raise ValueError(f"reward shaping {name!r} needs the reference responses' rewards r_ref (B, M)")
    if r_ref is not None and name in NEEDS_REFERENCE | {"tanh"}:
        params["r_ref"] = r_ref
    return SHAPINGS[name](r, **params)


class RunningNorm:
    """Running mean / variance of every reward seen, merged batch by batch (Chan et al. 1979 parallel update).

    ``update(x)`` merges a batch: with n, mean, M2 the running count, mean and sum of squared deviations,
    and n_b, mean_b, M2_b the batch's,  delta = mean_b - mean,  N = n + n_b,
    ``mean' = mean + delta * n_b / N`` and ``M2' = M2 + M2_b + delta^2 * n * n_b / N``. The statistics are
    exactly those of all values at once (float64). ``var`` is the population variance M2 / n.
    ``normalize(r)`` = (r - mean) / (std + eps), or r / (std + eps) with ``subtract_mean=False``.
    """

    def __init__(self, eps: float = 1e-8):
        self.eps = eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return self.var**0.5

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).double()  # (N,)
        if not torch.isfinite(x).all():
            raise ValueError("RunningNorm.update: the rewards contain NaN or inf")
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b = x.mean().item()
        m2_b = ((x - mean_b) ** 2).sum().item()
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta * delta * self.count * n_b / total
        self.count = total

    def normalize(self, r: torch.Tensor, subtract_mean: bool = True, update: bool = True) -> torch.Tensor:
        """Update with ``r`` (when ``update``), then return it normalised by the running statistics."""
        if update:
            self.update(r)
        out = r - self.mean if subtract_mean else r
        return out / (self.std + self.eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise KeyError(f"RunningNorm.load_state_dict: missing {sorted(missing)}")
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
