"""Masked reductions and loss aggregation shared by every online-RL loss (docs/online_rl.md).

Conventions: ``B`` rows (sequences), ``T`` response tokens. A ``mask`` is a (B, T) tensor of 0/1 or bool; it says which
positions are real response tokens. Positions outside the mask never contribute, whatever they hold (NaN or inf
included): every reduction selects with ``torch.where`` rather than multiplying, because ``nan * 0`` is ``nan``.

Aggregation modes (the knob that distinguishes GRPO, Dr. GRPO and DAPO) are in :data:`AGG_MODES`:

* ``token_mean``: ``Σ_{i,t} m·l / Σ_{i,t} m`` (DAPO, PPO in most libraries);
* ``seq_mean_token_mean``: ``(1/N) Σ_i [Σ_t m·l / Σ_t m]`` (GRPO as written in DeepSeekMath; GSPO);
* ``seq_mean_token_sum``: ``(1/N) Σ_i Σ_t m·l`` (sequence-level REINFORCE / RLOO);
* ``seq_mean_token_sum_norm``: ``(1/N) Σ_i Σ_t m·l / L`` with a fixed constant ``L`` (Dr. GRPO, Liu et al. 2025:
  ``1/(G·L_max)``), so that no weight depends on a response's length.

``N`` is the number of rows with at least one valid token (an all-padding row is not a sequence).

**Gradient accumulation.** A mini-batch split into micro-batches must give the same gradient as the whole
(docs/design.md, performance principles). Pass ``global_tokens`` (token_mean) or ``global_seqs`` (seq_* modes), the
count over the *whole* mini-batch, and sum, not average, the micro-batch losses:
``Σ_k aggregate(l_k, m_k, mode, global_tokens=N_tok) == aggregate(l, m, mode)``. Under data parallelism the global
count is the all-reduced one and gradients are summed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def _bool_mask(x: Tensor, mask: Tensor) -> Tensor:
    """Check ``mask`` against ``x`` and return it as bool, broadcast to ``x``'s shape."""
    if mask.shape != x.shape:
        if mask.dim() > x.dim() or any(
            m not in (1, s) for m, s in zip(reversed(mask.shape), reversed(x.shape), strict=False)
        ):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(x.shape)}")
    return mask.bool().expand_as(x)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``Σ x`` over the positions where ``mask`` is true; over all elements (``dim=None``) or along ``dim``.

    Shapes: x and mask (B, T) (any shape that matches). Returns a 0-dim tensor or x reduced along ``dim``.
    """
    m = _bool_mask(x, mask)
    xm = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``Σ m·x / max(Σ m, 1)``: the mean over valid positions; 0 where there is none (never NaN).

    Shapes: x and mask (B, T). ``dim=None`` reduces everything; ``dim=-1`` gives one mean per row, shape (B,).
    """
    m = _bool_mask(x, mask)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid entries of ``x`` (all of them together), 0-dim.

    ``var = Σ m·(x − μ)² / (n − 1)`` with Bessel's correction (``unbiased=True``, as ``torch.var``), else ``/ n``;
    ``μ`` is :func:`masked_mean` and ``n = Σ m``. With fewer than two valid entries the unbiased variance is 0.
    """
    m = _bool_mask(x, mask)
    mean = masked_mean(x, m)
    n = m.sum()
    denom = (n - 1) if unbiased else n
    return masked_sum((x - mean) ** 2, m) / denom.clamp(min=1).to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with the statistics of its valid entries: ``(x − μ) / sqrt(var + eps)``.

    ``var`` is the unbiased :func:`masked_var`, so the result has mean 0 and ``torch.std`` 1 over the valid entries.
    With ``shift_mean=False`` the mean is added back (only the scale changes; used for rewards). Positions outside
    the mask are set to 0. Shapes: x and mask (B, T) -> (B, T).
    """
    m = _bool_mask(x, mask)
    mean, var = masked_mean(x, m), masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


def zero_invalid(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with every position outside ``mask`` set to 0 (a ``where``, so NaN/inf padding disappears and gets
    exactly zero gradient). Losses apply it to their inputs so padding garbage can never reach ``exp`` or the
    backward pass. Shapes: (B, T) -> (B, T)."""
    return torch.where(_bool_mask(x, mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------------------------- aggregation
def _n_seqs(mask: Tensor, global_seqs: float | None, dtype: torch.dtype) -> Tensor | float:
    """Number of rows with at least one valid token, or the caller's global count (a float)."""
    if global_seqs is not None:
        return float(global_seqs)
    return (mask.sum(-1) > 0).sum().clamp(min=1).to(dtype)


def _token_mean(
    loss: Tensor, mask: Tensor, norm_len: float | None, global_tokens: float | None, global_seqs: float | None
) -> Tensor:
    n_tok = mask.sum().clamp(min=1).to(loss.dtype) if global_tokens is None else float(global_tokens)
    return masked_sum(loss, mask) / n_tok


def _seq_mean_token_mean(
    loss: Tensor, mask: Tensor, norm_len: float | None, global_tokens: float | None, global_seqs: float | None
) -> Tensor:
    per_seq = masked_mean(loss, mask, dim=-1)  # (B,)
    return per_seq.sum() / _n_seqs(mask, global_seqs, loss.dtype)


def _seq_mean_token_sum(
    loss: Tensor, mask: Tensor, norm_len: float | None, global_tokens: float | None, global_seqs: float | None
) -> Tensor:
    per_seq = masked_sum(loss, mask, dim=-1)  # (B,)
    return per_seq.sum() / _n_seqs(mask, global_seqs, loss.dtype)


def _seq_mean_token_sum_norm(
    loss: Tensor, mask: Tensor, norm_len: float | None, global_tokens: float | None, global_seqs: float | None
) -> Tensor:
    if norm_len is None or norm_len <= 0:
        raise ValueError(
            "aggregation mode 'seq_mean_token_sum_norm' needs norm_len > 0 (the fixed length constant L, "
            f"e.g. the generation budget max_new_tokens); got norm_len={norm_len!r}"
        )
    return _seq_mean_token_sum(loss, mask, None, None, global_seqs) / float(norm_len)


AGG_MODES: dict[str, Callable[[Tensor, Tensor, float | None, float | None, float | None], Tensor]] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum": _seq_mean_token_sum,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


def aggregate(
    loss_tokens: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    norm_len: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Tensor:
    """Reduce per-token losses (B, T) to a scalar with one of :data:`AGG_MODES` (formulas in the module docstring).

    Args:
        loss_tokens: (B, T) per-token loss. mask: (B, T) valid response tokens.
        mode: a key of :data:`AGG_MODES`.
        norm_len: the constant ``L`` of ``seq_mean_token_sum_norm`` (Dr. GRPO); ignored by the other modes.
        global_tokens: divide by this token count instead of the local ``Σ m`` (token_mean only).
        global_seqs: divide by this sequence count instead of the local one (seq_* modes only).

    All-masked rows add nothing; an all-masked batch gives 0 (not NaN).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid choices: {sorted(AGG_MODES)}")
    if loss_tokens.dim() != 2:
        raise ValueError(f"aggregate expects per-token losses of shape (B, T); got {tuple(loss_tokens.shape)}")
    if global_tokens is not None and mode != "token_mean":
        raise ValueError(f"global_tokens only applies to mode 'token_mean'; mode {mode!r} takes global_seqs")
    if global_seqs is not None and mode == "token_mean":
        raise ValueError("global_seqs does not apply to mode 'token_mean'; pass global_tokens")
    mask = _bool_mask(loss_tokens, mask)
    return AGG_MODES[mode](loss_tokens, mask, norm_len, global_tokens, global_seqs)
