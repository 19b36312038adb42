"""MA-RLHF: PPO on macro actions (spans of consecutive response tokens) instead of single tokens (docs/ma_ppo.md).

A response is cut into macro actions ω_1 .. ω_K by a termination rule; each token carries the index of its macro,
a (B, T) long tensor ``macro_ids`` (0, 1, 2, ... along the valid tokens of a row, -1 outside the mask):

* :func:`fixed_ngram_macros` -- every ``n`` tokens (``n = 1`` is token-level PPO);
* :func:`random_ngram_macros` -- span lengths drawn from a shuffled multiset (e.g. {1, 2, 3, 5, 10} x repeat);
  what is left of the response after the drawn spans is one final macro;
* :func:`perplexity_macros` -- a macro ends where the next token's negative log-prob rises
  (``nll[t+1] > nll[t]``): a token the policy finds harder than the one before opens a new macro.

:func:`macro_gae` runs GAE over macro steps: the reward of macro k is the sum of its token rewards, its value the
weighted sum ``V(ω_k) = Σ_{t∈ω_k} σ_t V_t`` (σ: ``equal`` 1/|ω_k|, ``unit`` the last token only, ``position``
∝ 1/(position in the macro), normalised), ``δ_k = r(ω_k) + γ V(ω_{k+1}) − V(ω_k)``, ``Â_k = δ_k + γλ Â_{k+1}``,
``G_k = Â_k + V(ω_k)``. Every token of macro k gets ``Â_k`` (the PPO clip keeps per-token ratios) and the macro
return ``G_k`` as its value target. With one token per macro this is token-level GAE exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignflow.algorithms.advantages import gae

Tensor = torch.Tensor

MACRO_WEIGHTS = ("equal", "unit", "position")


def _valid_index(mask: Tensor) -> Tensor:
    """0, 1, 2, ... along each row's valid tokens (B, T) long; -1 outside the mask."""
    m = mask.bool()
    return torch.where(m, m.long().cumsum(-1) - 1, torch.full_like(m, -1, dtype=torch.long))


def fixed_ngram_macros(mask: Tensor, n: int) -> Tensor:
    """Macro index of every token with macros of ``n`` tokens (the last may be shorter). (B, T) -> (B, T) long."""
    if n < 1:
        raise ValueError(f"fixed n-gram macros need n >= 1, got {n}")
    k = _valid_index(mask)
    return torch.where(k >= 0, k // n, k)


def random_ngram_macros(
    mask: Tensor, lengths: Sequence[int], repeat: int, generator: torch.Generator | None = None
) -> Tensor:
    """Macros of lengths drawn per row from the multiset ``lengths`` x ``repeat`` in a random order; the tokens
    after the drawn spans form one final macro. (B, T) -> (B, T) long."""
    if not lengths or any(int(n) < 1 for n in lengths) or repeat < 1:
        raise ValueError(f"random n-gram macros need lengths >= 1 and repeat >= 1, got {list(lengths)} x {repeat}")
    pool = torch.tensor([int(n) for n in lengths] * repeat, dtype=torch.long)  # (P,)
    k = _valid_index(mask)  # (B, T)
    rows = []
    for _ in range(mask.shape[0]):
        ends = pool[torch.randperm(len(pool), generator=generator)].cumsum(0)  # (P,) exclusive ends of the spans
        rows.append(ends)
    ends = torch.stack(rows).to(mask.device)  # (B, P)
    ids = torch.searchsorted(ends, k.clamp(min=0), right=True)  # (B, T): spans ending at or before the token
    return torch.where(k >= 0, ids, k)


def perplexity_macros(logprobs: Tensor, mask: Tensor) -> Tensor:
    """A new macro starts at token t+1 when ``−lp[t+1] > −lp[t]`` (its perplexity rises), compared along each
    row's valid tokens. logprobs, mask (B, T) -> (B, T) long."""
    m = mask.bool()
    k = _valid_index(mask)
    out = torch.full_like(k, -1)
    for b in range(m.shape[0]):
        pos = m[b].nonzero().flatten()
        if not len(pos):
            continue
        nll = -logprobs[b, pos].float()  # (L,)
        starts = torch.zeros_like(pos)
        starts[1:] = (nll[1:] > nll[:-1]).long()
        out[b, pos] = starts.cumsum(0)
    return out


def macro_weights(macro_ids: Tensor, mask: Tensor, kind: str = "equal") -> Tensor:
    """σ_t of every token within its macro (sums to 1 over a macro): (B, T) -> (B, T) float, 0 outside the mask."""
    if kind not in MACRO_WEIGHTS:
        raise ValueError(f"unknown macro value weighting {kind!r}; valid choices: {list(MACRO_WEIGHTS)}")
    m = mask.bool()
    ids = macro_ids.clamp(min=0)
    B, T = ids.shape
    k = _valid_index(mask)  # (B, T)
    size = torch.zeros(B, T, device=ids.device).scatter_add_(1, ids, m.float())  # (B, K) tokens per macro
    big = torch.full((B, T), T, dtype=torch.long, device=ids.device)
    first = big.scatter_reduce(1, ids, torch.where(m, k, big), "amin")  # (B, K) valid index of a macro's start
    pos_in = (k - first.gather(1, ids) + 1).clamp(min=1).float()  # (B, T): 1, 2, ... inside the macro
    if kind == "equal":
        w = 1.0 / size.gather(1, ids).clamp(min=1.0)
    elif kind == "unit":
        w = (pos_in == size.gather(1, ids)).float()
    else:
        inv = torch.where(m, 1.0 / pos_in, torch.zeros(()))
        norm = torch.zeros(B, T, device=ids.device).scatter_add_(1, ids, inv)
        w = inv / norm.gather(1, ids).clamp(min=1e-12)
    return torch.where(m, w, torch.zeros((), device=ids.device))


@torch.no_grad()
def macro_gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    macro_ids: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    weighting: str = "equal",
) -> tuple[Tensor, Tensor]:
    """GAE over macro actions (module docstring). token_rewards, values, mask, macro_ids (B, T).

    Returns (advantages, returns), both (B, T): every token of macro k holds ``Â_k`` and ``G_k``; 0 outside the mask.
    """
    m = mask.bool()
    ids = torch.where(m, macro_ids, torch.zeros_like(macro_ids)).long()
    B, T = ids.shape
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(m, token_rewards.to(values.dtype), zero)
    sigma = macro_weights(macro_ids, mask, weighting).to(values.dtype)
    r_macro = torch.zeros(B, T, dtype=values.dtype, device=values.device).scatter_add_(1, ids, r)  # (B, K)
    v_macro = torch.zeros_like(r_macro).scatter_add_(1, ids, torch.where(m, sigma * values, zero))  # (B, K)
    k_mask = torch.zeros(B, T, dtype=torch.long, device=values.device).scatter_add_(1, ids, m.long()) > 0  # (B, K)
    adv_k, ret_k = gae(r_macro, v_macro, k_mask, gamma, lam)  # (B, K) each
    adv = torch.where(m, adv_k.gather(1, ids), zero)
    ret = torch.where(m, ret_k.gather(1, ids), zero)
    return adv, ret


MACRO_RULES = ("fixed", "random", "perplexity")
