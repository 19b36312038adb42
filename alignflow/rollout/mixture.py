"""Sampling from the per-token geometric mixture of two causal LMs: ``π_mix(y_t|·) ∝ π_θ(y_t|·)^(1-β)·π_ref(y_t|·)^β``.

Nash-MD's opponent (docs/online_po.md). At every step both models run one forward with their own KV cache, their
next-token log-softmaxes are mixed by :func:`alignflow.algorithms.nash.mixture_logits`, and the token is drawn by the
built-in engine's sampler (:func:`alignflow.rollout.sampling.sample_tokens`: temperature, top-k, top-p, min-p of
``SamplingParams`` apply to the mixture). Like TRL's NashMD this is a token-level mixture: the product of
per-token mixtures is not the sequence-level geometric mixture of the paper (whose normaliser is intractable).

Departure from ``HFEngine``: ended rows stay in the running batch (they are fed padding and cut by the response
mask), so there is no row compaction and no lean forward; Nash-MD draws one opponent per policy sample, so this
costs about two model forwards per token, the price of the method. ``ref_context`` wraps every reference forward:
pass ``policy.disable_adapter`` with ``ref = policy`` to use a LoRA policy's base weights as the reference (two KV
caches, one module, no copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from alignflow.algorithms.nash import mixture_logits
from alignflow.batch import Batch
from alignflow.rollout.engine import pad_prompts
from alignflow.rollout.sampling import SamplingParams, chosen_logprobs, sample_keys, sample_tokens

# forward(tokens (B, 1), mask, position (B, 1)) -> (policy logits, reference logits), (B, V) each
_Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _left_pad(
    prompt_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate_mixture: prompt_ids must be a non-empty list of non-empty token-id lists")
    ids, mask = pad_prompts(prompt_ids, pad_id)
    return ids.to(device), mask.to(device)  # (P, Tp) each


def _forward(
    model: Any, cache: DynamicCache, ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor
) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True)
    logits: torch.Tensor = out.logits[:, -1].float()  # (B, V)
    return logits


def _decode(
    forward: _Forward,
    logits: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    params: SamplingParams,
    coef: float,
    eos: torch.Tensor,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode loop: mix, sample, record, end rows; ``forward(tokens (B, 1), mask, position (B, 1))`` gives the
    next (policy, reference) logits. Returns tokens and log-probs (B, T), lengths (B,), ended-by-EOS (B,)."""
    B, T, device = mask.shape[0], params.max_new_tokens, mask.device
    gen, keys = None, None
    if params.seeds is not None:  # row i*n + j draws from the stream (seeds[i], j): independent of the batch
        keys = sample_keys(params.seeds, params.n, device)  # (B, 2)
    else:
        gen = torch.Generator(device=device)
        gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(B, T, device=device)
    length = torch.full((B,), T, dtype=torch.long, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)
    by_eos = torch.zeros(B, dtype=torch.bool, device=device)
    pos = mask.sum(-1)  # (B,) position of the next token
    for t in range(T):
        mixed = mixture_logits(*logits, coef)  # (B, V)
        tok = torch.where(running, sample_tokens(mixed, params, gen, keys=keys, step=t), pad_id)  # (B,)
        tokens[:, t] = tok
        logps[:, t] = torch.where(running, chosen_logprobs(mixed, tok, params.temperature), 0.0)
        ended = running & torch.isin(tok, eos)
        length = torch.where(ended, t + 1, length)
        by_eos |= ended
        running = running & ~ended
        if t + 1 == T or not bool(running.any()):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, Tp + t + 1)
        logits = forward(tok[:, None], mask, pos[:, None])
        pos = pos + 1
    return tokens, logps, length, by_eos


@torch.no_grad()
def generate_mixture(
    policy: Any,
    ref: Any,
    prompt_ids: Sequence[Sequence[int]],
    params: SamplingParams,
    coef: float,
    *,
    eos_ids: Sequence[int],
    pad_id: int,
    ref_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> Batch:
    """``params.n`` samples per prompt from the mixture with coefficient β = ``coef`` (rows i*n .. i*n+n-1 are
    prompt i's). Returns the ``HFEngine.generate`` layout: ``prompt_ids``/``prompt_mask`` (B, Tp) left-padded,
    ``response_ids``/``response_mask`` (B, Tr) (the EOS that ends a row included), ``input_ids``,
    ``attention_mask``, ``position_ids`` (B, Tp + Tr), ``sampling_logprobs`` (B, Tr) = log π_mix(y_t) at the
    sampling temperature (before top-k/top-p truncation, like the engine's); meta ``prompt_index``,
    ``finish_reason`` ("eos" or "length"). Stop strings and the repetition penalty are not supported here.
    ``params.seeds`` (one per prompt) keys the noise per row as in ``HFEngine``; a row's tokens then do not depend
    on the other prompts, up to the floating-point effect of their left padding on the two forwards."""
    params.validate()
    params.check_seeds(len(prompt_ids), "generate_mixture")
    if params.stop_strings or params.stop_token_ids or params.repetition_penalty != 1.0:
        raise ValueError(
            "generate_mixture: stop strings, stop token ids and the repetition penalty are not "
            "supported by the mixture sampler"
        )
    device = next(policy.parameters()).device
    prompt, prompt_mask = _left_pad(prompt_ids, pad_id, device)
    prompt, prompt_mask = prompt.repeat_interleave(params.n, 0), prompt_mask.repeat_interleave(params.n, 0)  # (B, Tp)
    caches = [DynamicCache(config=policy.config), DynamicCache(config=ref.config)]

    def forward(ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (policy logits, reference logits), (B, V) each
        pol = _forward(policy, caches[0], ids, mask, position)
        with ref_context():
            return pol, _forward(ref, caches[1], ids, mask, position)

    modes = [(m, m.training) for m in {id(policy): policy, id(ref): ref}.values()]
    for m, _ in modes:
        m.eval()
    try:
        first = forward(prompt, prompt_mask, (prompt_mask.cumsum(-1) - 1).clamp_min(0))
        tokens, logps, length, by_eos = _decode(
            forward, first, prompt_mask, params, coef, torch.tensor(list(eos_ids), device=device), pad_id
        )
    finally:
        for m, was in modes:
            m.train(was)
    width = int(length.max())
    response_mask = (torch.arange(width, device=device)[None] < length[:, None]).long()  # (B, Tr)
    response = tokens[:, :width].masked_fill(response_mask == 0, pad_id)  # (B, Tr)
    attention = torch.cat([prompt_mask, response_mask], 1)  # (B, Tp + Tr)
    return Batch(
        {
            "prompt_ids": prompt,
            "prompt_mask": prompt_mask,
            "response_ids": response,
            "response_mask": response_mask,
            "input_ids": torch.cat([prompt, response], 1),
            "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0),
            "sampling_logprobs": logps[:, :width] * response_mask,
        },
        {
            "prompt_index": [i // params.n for i in range(len(prompt))],
            "finish_reason": ["eos" if e else "length" for e in by_eos.tolist()],
        },
    )
