"""Memory-lean per-token log-probabilities (and entropies) of a causal LM.

Convention (used everywhere in alignflow): the outputs are (B, T), aligned with the INPUT tokens::

    logp[:, t] = log p(x_t | x_<t)   for t >= 1,      logp[:, 0] = 0   (nothing predicts the first token)

so a ``loss_mask`` / ``response_mask`` over input tokens multiplies ``logp`` directly, with no shifting at
the call site. ``entropy[:, t]`` is the entropy of the same distribution p(. | x_<t) (0 at t = 0).

Why not ``model(input_ids).logits``: that materialises (B, T, V) logits, and the fp32 copy that
``log_softmax`` needs, for the whole sequence at once, and autograd keeps it for the backward. With a
150k vocabulary and T = 4096 that is 2.4 GB per row. Here the backbone runs once, then the LM head, the
fp32 cast, ``log_softmax`` and the gather run over chunks of T, each chunk under
``torch.utils.checkpoint`` so the backward recomputes one chunk's logits at a time instead of storing all
of them. The result equals the naive computation (tests check values and gradients).

Chunking is adaptive: when the fp32 logits of the whole batch fit ``LOGITS_BUDGET_BYTES`` (a small
vocabulary, short rows) there is one chunk and no checkpoint -- recomputing the LM head in the backward would
cost time and save nothing worth having. An explicit ``chunk_size`` always chunks (and checkpoints).

For a loss over some positions only (SFT's completion-only NLL), :func:`masked_nll_sum` gathers the hidden
states of those positions FIRST and runs the LM head on them alone.

Both accept padding-free rows (``seq_lens``, see :mod:`alignflow.models.varlen`): sequences laid end to end in
one row; the first token of every sequence then predicts nothing, like position 0.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from alignflow.models.backbone import get_lm_head, hidden_states, unwrap
from alignflow.models.varlen import flat_hidden_states

IGNORE_INDEX = -100
LOGITS_BUDGET_BYTES = 256 * 2**20  # fp32 logits up to this size are computed in one piece, without checkpoint
DEFAULT_CHUNK = 1024  # positions per chunk above the budget


def _chunk_stats(
    head: nn.Module,
    h: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
) -> torch.Tensor:
    """For hidden states h (B, c, H) and targets (B, c): log p(target) and optionally the entropy, (B, c, 1|2)."""
    logits = head(h).float()  # (B, c, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap  # Gemma-2 style final-logit soft-capping
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # (B, c)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # (B, c)
    if not with_entropy:
        return logp.unsqueeze(-1)  # (B, c, 1)
    probs = torch.softmax(logits, dim=-1)  # (B, c, V)
    entropy = lse - (probs * logits).sum(-1)  # (B, c):  H = logsumexp(z) - sum_v p_v z_v
    return torch.stack([logp, entropy], dim=-1)  # (B, c, 2)


def _hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    seq_lens,
) -> torch.Tensor:
    """Final hidden states (B, T, H): padding-free when ``seq_lens`` is given (then B = 1 and no mask)."""
    if seq_lens is None:
        return hidden_states(model, input_ids, attention_mask, position_ids)
    if attention_mask is not None:
        raise ValueError("seq_lens (a padding-free row) and attention_mask are exclusive")
    return flat_hidden_states(model, input_ids, seq_lens, position_ids)


def _starts(seq_lens, T: int, device) -> torch.Tensor:
    """(1, T) bool: True at the first token of every sequence of a padding-free row (nothing predicts it)."""
    first = torch.zeros(1, T, dtype=torch.bool, device=device)
    first[0, torch.tensor([0] + list(seq_lens[:-1]), device=device).cumsum(0)] = True
    return first


def logits_budget(device) -> int:
    """Bytes of fp32 logits computed in one piece (no recompute): :data:`LOGITS_BUDGET_BYTES` on a CPU; on a GPU
    1/16 of its memory (8.7 GB on an H200: a 16k-token micro-batch at a 150k vocabulary), where recomputing the
    LM head in the backward costs more than the memory is worth."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return max(LOGITS_BUDGET_BYTES, torch.cuda.get_device_properties(device).total_memory // 16)
    return LOGITS_BUDGET_BYTES


def _plan_chunks(positions: int, vocab: int, chunk_size: int | None, device=None) -> tuple[int | None, bool]:
    """(chunk size or None for one piece, whether to checkpoint) for ``positions`` x ``vocab`` fp32 logits."""
    if chunk_size is None:
        if positions * vocab * 4 <= logits_budget(device):
            return None, False
        chunk_size = DEFAULT_CHUNK
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size, True


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
    seq_lens=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs ``(logp, entropy)``, each (B, T) float32; ``entropy`` is None unless asked for.

    Args:
        model: a causal LM (transformers, peft-wrapped, tied or untied LM head).
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1/0 padding mask, or (B, 1, T, T) block-diagonal mask of packed rows
            (then ``position_ids`` are required).
        position_ids: (B, T); derived from a 2-D mask when omitted.
        labels: (B, T) targets in the same positions as ``input_ids`` (Hugging Face convention: the model
            does the shift); position t gets log p(labels[:, t] | x_<t). ``-100`` gives 0. Default: input_ids.
        chunk_size: positions per LM-head chunk (a memory knob; results do not depend on it). None: one
            chunk without checkpoint when the logits fit ``LOGITS_BUDGET_BYTES``, else chunks of 1024.
        with_entropy: also return the entropy of p(. | x_<t) at each position.
        temperature: logits are divided by it (use the sampling temperature in RL).
        seq_lens: lengths of the sequences laid end to end in a padding-free row (B = 1, no mask); the
            first token of each gets logp 0 (and entropy of the previous sequence's last position -- mask it).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    targets = (input_ids if labels is None else labels)[:, 1:]  # (B, T-1): token t+1 is predicted at t
    ignored = targets == IGNORE_INDEX  # (B, T-1)
    if seq_lens is not None:
        ignored = ignored | _starts(seq_lens, T, input_ids.device)[:, 1:]  # (1, T-1)
    targets = targets.masked_fill(ignored, 0)
    head = get_lm_head(model)
    size, use_ckpt = _plan_chunks(B * max(T - 1, 0), head.weight.shape[0], chunk_size, input_ids.device)
    size = size or max(T - 1, 1)  # positions of T per chunk
    h = _hidden(model, input_ids, attention_mask, position_ids, seq_lens)[:, :-1]  # (B, T-1, H)
    softcap = getattr(unwrap(model).config, "final_logit_softcapping", None)
    use_ckpt = (
        use_ckpt and torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    )
    pieces = []
    for s in range(0, T - 1, size):
        args = (head, h[:, s : s + size], targets[:, s : s + size], temperature, softcap, with_entropy)
        pieces.append(checkpoint(_chunk_stats, *args, use_reentrant=False) if use_ckpt else _chunk_stats(*args))
    k = 2 if with_entropy else 1
    stats = torch.cat(pieces, dim=1) if pieces else h.new_zeros(B, 0, k, dtype=torch.float32)  # (B, T-1, k)
    stats = torch.cat([stats.new_zeros(B, 1, k), stats], dim=1)  # (B, T, k): position 0 predicts nothing
    logp = stats[..., 0].masked_fill(torch.cat([ignored.new_ones(B, 1), ignored], dim=1), 0.0)  # (B, T)
    entropy = stats[..., 1] if with_entropy else None  # (B, T)
    return logp, entropy


def selected_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    where: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    seq_lens=None,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logp, entropy)`` (M,) float32 at the M positions where ``where`` (B, T) is True, in row-major order:
    ``logp = log p(x_t | x_<t)`` and the entropy of that distribution, with the LM head run ONLY on the hidden
    states that predict those tokens. A response-only RL loss or completion-only SFT never pays for the
    prompt's logits: with a 150k vocabulary the head is the largest matmul of a small model.

    ``where`` is aligned with the input tokens (position 0 of a row, and of each sequence of a padding-free row,
    predicts nothing and counts as False). Equals ``token_logprobs(...)[where]`` (tests check values and grads).
    """
    if where.shape != input_ids.shape:
        raise ValueError(
            f"the position mask {tuple(where.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    h = _hidden(model, input_ids, attention_mask, position_ids, seq_lens)  # (B, T, H)
    sel = where[:, 1:].bool()  # (B, T-1): position t predicts token t+1
    if seq_lens is not None:
        sel = sel & ~_starts(seq_lens, input_ids.shape[1], input_ids.device)[:, 1:]
    hs = h[:, :-1][sel]  # (M, H): only the positions in the loss
    targets = input_ids[:, 1:][sel]  # (M,)
    return head_stats(model, hs, targets, temperature, with_entropy, chunk_size)


def head_stats(
    model: nn.Module,
    hs: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logp, entropy)`` (M,) float32 of ``targets`` (M,) under the LM head applied to hidden states ``hs`` (M, H)
    only, in checkpointed chunks when the fp32 logits would exceed :func:`logits_budget`."""
    head = get_lm_head(model)
    softcap = getattr(unwrap(model).config, "final_logit_softcapping", None)
    size, use_ckpt = _plan_chunks(hs.shape[0], head.weight.shape[0], chunk_size, hs.device)
    size = size or max(hs.shape[0], 1)
    use_ckpt = (
        use_ckpt and torch.is_grad_enabled() and (hs.requires_grad or any(p.requires_grad for p in head.parameters()))
    )
    pieces = []
    for s in range(0, hs.shape[0], size):
        args = (head, hs[None, s : s + size], targets[None, s : s + size], temperature, softcap, with_entropy)
        pieces.append(checkpoint(_chunk_stats, *args, use_reentrant=False) if use_ckpt else _chunk_stats(*args))
    k = 2 if with_entropy else 1
    stats = torch.cat(pieces, dim=1)[0] if pieces else hs.new_zeros(0, k, dtype=torch.float32)  # (M, k)
    return stats[:, 0], (stats[:, 1] if with_entropy else None)


def masked_nll_sum(
    model: nn.Module,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    seq_lens=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``-sum_{t: loss_mask[b, t] = 1} log p(x_t | x_<t)``, a float32 scalar, with the LM head run ONLY on the
    positions that predict a loss token (completion-only SFT skips the prompt's logits entirely).

    ``loss_mask`` (B, T) is aligned with the input tokens (position 0 of a row, and of each sequence of a
    padding-free row, predicts nothing and must be 0 there). Masks, positions and ``seq_lens`` are as in
    :func:`token_logprobs`; the value equals ``-(token_logprobs(...)[0] * loss_mask).sum()``.
    """
    if loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    logp, _ = selected_logprobs(model, input_ids, loss_mask, attention_mask, position_ids, seq_lens, chunk_size)
    return -logp.sum()
