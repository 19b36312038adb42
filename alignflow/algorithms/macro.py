"""MA-RLHF: PPO on macro actions (spans of consecutive response tokens) instead of single tokens (docs/ma_ppo.md).

A response is cut into macro actions ω_1 .. ω_K by a termination rule; each token carries the index of its macro,
a (B, T) long tensor ``macro_ids`` (0, 1, 2, ... along the valid tokens of a row, -1 outside the mask):

* :func:`fixed_ngram_macros` -- every ``n`` tokens (``n = 1`` is token-level PPO);
* :func:`random_ngram_macros` -- span lengths drawn from a shuffled multiset (e.g. {1, 2, 3, 5, 10} x repeat);
  what is left of the response after the drawn spans is one final macro;
* :func:`perplexity_macros` -- a macro ends where the next token's negative log-prob rises
  (``nll[t+1] > nll[t]``): a token the policy finds harder than the one before opens a new macro.
* :func:`parse_macros` -- a shallow phrase chunker standing in for a constituency parser: a phrase opens
  before punctuation and before a conjunction, preposition or determiner (:func:`phrase_openers` marks those
  vocabulary entries); a one-token phrase joins the phrase before it (the paper's rule for single-token nodes),
  and a phrase longer than ``cutoff`` tokens is cut every ``cutoff`` tokens.

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


# Closed-class English words that open a phrase (the chunker cuts before them); punctuation opens one too.
DETERMINERS = frozenset(
    "the a an this that these those my your his her its our their some any no every each either neither "
    "another such".split()
)
CONJUNCTIONS = frozenset("and but or nor yet while although though because whereas unless if when since".split())
PREPOSITIONS = frozenset(
    "of in on at to for with by from about into onto over under after before through between during without "
    "within against among around across behind beyond near off upon than via per".split()
)  # "so" (also an intensifier, "so good") and "like" (also a verb) are left out: a word list cannot tell them apart
PHRASE_OPENERS = DETERMINERS | CONJUNCTIONS | PREPOSITIONS
WORD_START_MARKS = ("\u0120", "\u2581")  # byte-level BPE's "G-dot" and SentencePiece's "lower one-eighth block"


def phrase_openers(vocab: Sequence[str]) -> Tensor:
    """Which vocabulary entries open a phrase: (V,) bool, from each token's text (``convert_ids_to_tokens``).

    Punctuation (a token whose text, word-start mark removed, has no letter or digit) always opens one. A word of
    :data:`PHRASE_OPENERS` (case-insensitive) opens one when it starts a word: in a vocabulary that marks word
    starts (byte-level BPE, SentencePiece) only the marked form does, so "and" inside "band" does not; in a
    word-level vocabulary (no marks) every entry is a whole word."""
    marked = any(t.startswith(WORD_START_MARKS) for t in vocab if t)
    out = []
    for tok in vocab:
        tok = tok or ""
        starts_word = tok.startswith(WORD_START_MARKS) or not marked
        text = tok.lstrip("".join(WORD_START_MARKS))
        punct = bool(text) and not any(c.isalnum() for c in text)
        out.append(punct or (starts_word and text.lower() in PHRASE_OPENERS))
    return torch.tensor(out, dtype=torch.bool)


def parse_macros(token_ids: Tensor, mask: Tensor, openers: Tensor, cutoff: int = 0) -> Tensor:
    """Phrase macros of each row (module docstring): token_ids, mask (B, T), openers (V,) bool from
    :func:`phrase_openers` (ids beyond it open nothing); ``cutoff`` 0: no length limit. -> (B, T) long."""
    if cutoff < 0:
        raise ValueError(f"parse macros need cutoff >= 0, got {cutoff}")
    m = mask.bool()
    out = torch.full(m.shape, -1, dtype=torch.long, device=m.device)
    table = openers.to(m.device)
    for b in range(m.shape[0]):
        pos = m[b].nonzero().flatten()
        if not len(pos):
            continue
        ids = token_ids[b, pos].long()
        start = table[ids.clamp(0, len(table) - 1)] & (ids < len(table))  # (L,)
        start[0] = True
        chunk = start.long().cumsum(0) - 1
        size = torch.bincount(chunk)
        single = start & (size[chunk] == 1)
        single[0] = False  # the first phrase has no phrase before it to join
        start = start & ~single
        if cutoff:
            first = torch.nonzero(start).flatten()  # (K,) each phrase's first position
            begin = first[start.long().cumsum(0) - 1]  # (L,) where the token's phrase begins
            start = start | ((torch.arange(len(pos), device=m.device) - begin) % cutoff == 0)
        out[b, pos] = start.long().cumsum(0) - 1
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


MACRO_RULES = ("fixed", "random", "perplexity", "parse")
