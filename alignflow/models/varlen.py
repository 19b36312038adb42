"""Padding-free ("varlen") forward passes: many sequences laid end to end in ONE row, no padding, no mask.

Why: on a CPU (and on a GPU without flash-attention) a packed row needs a (T, T) block-diagonal mask, and the
attention kernel then does the work of the whole T x T square; padded batches waste the linear layers'
work on pad tokens instead. Here the linear layers (most of the FLOPs) run once over exactly the real tokens
(1, N, H), and attention runs per sequence with ``scaled_dot_product_attention(is_causal=True)`` -- the
same computation as running each sequence alone, which is what flash-attention's variable-length kernels do
on a GPU. Position ids restart at every sequence, so rotary embeddings see each sequence from position 0.

How: a function registered in transformers' ``AttentionInterface`` under :data:`VARLEN` splits q, k, v at the
sequence boundaries (``seq_lens``, passed through the model's ``**kwargs`` down to the attention layers).
:func:`flat_hidden_states` switches the model's ``config._attn_implementation`` to it for the duration of one
forward call (with no mask created: transformers creates none for an implementation it has no mask function
for) and back. The backward pass does not call the attention implementation again, EXCEPT under gradient
checkpointing, which re-runs forwards after the switch-back -- so :func:`supports_varlen` refuses a model with
checkpointing on, and callers fall back to padded batches.

Supported: decoder-only architectures whose attention goes through ``ALL_ATTENTION_FUNCTIONS`` with no
logit soft-capping or attention sinks (``VARLEN_MODEL_TYPES``), under ``sdpa`` or ``eager`` (same maths);
sliding-window layers get a banded causal mask per sequence.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from alignflow.models.backbone import get_backbone, unwrap

VARLEN = "alignflow_varlen"
# Architectures whose attention is plain (optionally grouped-query, optionally sliding-window) causal softmax
# attention dispatched through ALL_ATTENTION_FUNCTIONS: the per-sequence kernel below computes it exactly.
VARLEN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_REGISTERED = False
USE_FLASH = True  # False forces the per-sequence SDPA path on CUDA too (the reference in tests/test_gpu.py)
FLASH_DEVICES = ("cuda",)  # where the flash kernel runs; CPU tests add "cpu" with a stand-in kernel
_FLASH_API: dict | None = None


def _band_mask(n: int, window: int, device) -> torch.Tensor:
    """(n, n) bool: causal and at most ``window - 1`` positions back (a sliding-window layer)."""
    i = torch.arange(n, device=device)
    diff = i[:, None] - i[None, :]  # (n, n): query - key
    return (diff >= 0) & (diff < window)


def _flash_api() -> dict | None:
    """The parameters of ``torch.nn.attention.varlen.varlen_attn`` in this torch (None when it is absent).

    Two API shapes exist: torch 2.9 took ``is_causal`` (no GQA, no scale, no window); later releases take
    ``window_size=(left, right)``, ``enable_gqa`` and ``scale``. :func:`flash_varlen` speaks both."""
    global _FLASH_API
    if _FLASH_API is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _FLASH_API = {}
        else:
            _FLASH_API = {"fn": varlen_attn, "params": set(inspect.signature(varlen_attn).parameters)}
    return _FLASH_API or None


def flash_usable(query: torch.Tensor, dropout: float = 0.0, window: int | None = None) -> bool:
    """True when :func:`flash_varlen` can run ``query``: CUDA, half precision, no dropout, head dim <= 256, the
    kernel present in this torch (and a sliding window only where its API takes one). :data:`USE_FLASH` off
    forces the per-sequence path (the reference the GPU tests compare against)."""
    api = _flash_api() if USE_FLASH else None
    return (
        bool(api)
        and query.device.type in FLASH_DEVICES
        and query.dtype in (torch.float16, torch.bfloat16)
        and dropout == 0.0
        and query.shape[-1] <= 256
        and query.shape[-1] % 8 == 0
        and (window is None or "window_size" in api["params"])
    )


def flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    causal: bool,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Flash attention over sequences laid end to end: q (Nq, Hq, D), k/v (Nk, Hkv, D) -> (Nq, Hq, D).

    ``cu_q`` / ``cu_k`` (n + 1,) int32 cumulative lengths. ``causal``: query i of a sequence sees keys up to its
    own position (aligned at the end when a sequence has fewer queries than keys); ``window``: HF's
    ``sliding_window`` W (keys at most W - 1 positions back). GQA is native where the API has ``enable_gqa``,
    else the KV heads are repeated; a scale the API cannot take is folded into q.
    """
    api = _flash_api()
    params, kwargs = api["params"], {}
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    if "window_size" in params:
        kwargs["window_size"] = ((window - 1) if window else -1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:
            q = q * (scale * q.shape[-1] ** 0.5)  # the kernel divides by sqrt(D)
    return api["fn"](q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    seq_lens: Sequence[int] | None = None,
    last_query_layer: int | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention of each sequence of a flat row: q (1, h, N, d), k/v (1, h_kv, N, d) -> (1, N, h, d).

    On CUDA in half precision one flash kernel runs every sequence (:func:`flash_varlen`, with ``cu_seq_lens``
    built once per forward by :func:`flat_hidden_states`); elsewhere one SDPA call per sequence (the CPU path and
    the reference). In layer ``last_query_layer`` only each sequence's LAST query is computed (the other rows
    are 0: the caller never reads them, see :func:`flat_last_hidden`).
    """
    if seq_lens is None or attention_mask is not None:
        raise RuntimeError(
            f"the {VARLEN} attention needs seq_lens and no attention mask; run the model through "
            "alignflow.models.varlen.flat_hidden_states"
        )
    if query.shape[0] != 1 or sum(seq_lens) != query.shape[2]:
        raise RuntimeError(f"flat row of {tuple(query.shape)} does not hold sequences of {sum(seq_lens)} tokens")
    window = getattr(module, "sliding_window", None)
    last_only = last_query_layer is not None and getattr(module, "layer_idx", None) == last_query_layer
    if (
        cu_seq_lens is not None
        and query.dtype == torch.float32
        and query.device.type in FLASH_DEVICES
        and torch.is_autocast_enabled(query.device.type)
    ):
        # an fp32 model under autocast: RoPE promoted q/k back to fp32, and SDPA would run in the autocast dtype
        # anyway (it is on autocast's lower-precision list); cast for the flash kernel the same way
        low = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(low), key.to(low), value.to(low)
    if (
        cu_seq_lens is not None
        and flash_usable(query, dropout, window if not last_only else None)
        and not (last_only and window)
    ):
        return _flash_layer(query, key, value, seq_lens, cu_seq_lens, scaling, window, last_only), None
    gqa = query.shape[1] != key.shape[1]
    # torch.split (not slicing) so that autograd joins the gradients with one cat instead of n zero-padded adds
    qs, ks, vs = query.split(list(seq_lens), 2), key.split(list(seq_lens), 2), value.split(list(seq_lens), 2)
    outs = []
    for q, k, v, n in zip(qs, ks, vs, seq_lens, strict=False):
        if last_only:  # one query that sees its whole sequence (or its window)
            q, k, v = q[:, :, -1:], k[:, :, -window:] if window else k, v[:, :, -window:] if window else v
            outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, enable_gqa=gqa))
            continue
        mask = _band_mask(n, window, q.device) if window and n > window else None
        outs.append(
            F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=scaling, enable_gqa=gqa
            )
        )  # (1, h, n, d)
    if last_only:
        rows = last_positions(seq_lens, query.device)  # (n,)
        last = torch.cat(outs, 2).transpose(1, 2)  # (1, n, h, d)
        return last.new_zeros(1, query.shape[2], *last.shape[2:]).index_copy(1, rows, last), None  # (1, N, h, d)
    return torch.cat(outs, 2).transpose(1, 2), None  # (1, N, h, d)


def _flash_layer(query, key, value, seq_lens, cu, scaling, window, last_only) -> torch.Tensor:
    """:func:`varlen_attention` through one flash kernel: q (1, h, N, d), k/v (1, h_kv, N, d) -> (1, N, h, d)."""
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # (N, h, d) views
    longest = max(seq_lens)
    if not last_only:
        return flash_varlen(q, k, v, cu, cu, longest, longest, causal=True, window=window, scale=scaling)[None]
    rows = cu[1:].long() - 1  # (n,) each sequence's last token
    one = torch.arange(len(seq_lens) + 1, device=cu.device, dtype=cu.dtype)  # one query per sequence
    last = flash_varlen(q[rows], k, v, one, cu, 1, longest, causal=False, scale=scaling)  # (n, h, d)
    return last.new_zeros(1, query.shape[2], *last.shape[1:]).index_copy(1, rows, last[None])  # (1, N, h, d)


def register() -> None:
    """Add :func:`varlen_attention` to transformers' attention registry (once)."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(VARLEN, varlen_attention)
        _REGISTERED = True


def supports_varlen(model: nn.Module) -> bool:
    """True when :func:`flat_hidden_states` computes exactly what a padded forward would for this model."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in VARLEN_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", VARLEN):
        return False
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(base), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )  # renamed in transformers 5.x
    return not getattr(base, flag, False)


@contextlib.contextmanager
def _attention_implementation(config, name: str):
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def flat_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    seq_lens: Sequence[int],
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Final hidden states (1, N, H) of sequences laid end to end in ``input_ids`` (1, N), lengths ``seq_lens``.

    ``position_ids`` (1, N) restart at 0 for every sequence; built from ``seq_lens`` when omitted.
    """
    if not supports_varlen(model):
        raise ValueError(
            f"{type(unwrap(model)).__name__} does not support padding-free batches "
            "(see alignflow.models.varlen.supports_varlen); use padded batches"
        )
    lens = [int(n) for n in seq_lens]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or sum(lens) != input_ids.shape[1] or min(lens) < 1:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} must be (1, N) with N = sum(seq_lens) = {sum(lens)} "
            "and every length >= 1"
        )
    if position_ids is None:
        position_ids = flat_positions(lens).to(input_ids.device, non_blocking=True)[None]  # (1, N)
    if input_ids.device.type in FLASH_DEVICES:  # cumulative lengths for the flash kernel, once per forward
        kwargs["cu_seq_lens"] = cumulative(lens).to(input_ids.device, non_blocking=True)
    register()
    with _attention_implementation(unwrap(model).config, VARLEN):
        out = get_backbone(model)(
            input_ids=input_ids,
            attention_mask=None,
            position_ids=position_ids,
            use_cache=False,
            seq_lens=lens,
            **kwargs,
        )
    return out.last_hidden_state  # (1, N, H)


def _rows_only(module: nn.Module, rows: torch.Tensor, total: int) -> list:
    """Hooks making a row-wise module (1, N, a) -> (1, N, b) run on ``rows`` only (0 elsewhere); returns them."""

    def before(_, args):
        return (args[0][:, rows],) + tuple(args[1:])  # (1, n, a)

    def after(_, __, out):
        return out.new_zeros(1, total, out.shape[-1]).index_copy(1, rows, out)  # (1, N, b)

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


def flat_last_hidden(model: nn.Module, input_ids: torch.Tensor, seq_lens: Sequence[int]) -> torch.Tensor:
    """Final hidden state (n, H) at each sequence's LAST token of a flat row (a reward model's input).

    Equals ``flat_hidden_states(...)[0, last_positions(seq_lens)]``, but the last decoder layer computes its
    attention, output projection and MLP only at those n rows: nothing else reaches the output, and for
    sequences of ~100 tokens that skips ~80% of the last layer's work (the keys and values of every token
    are still computed, since the last query attends to them).
    """
    backbone = get_backbone(model)
    layer = backbone.layers[backbone.config.num_hidden_layers - 1]
    rows = last_positions(seq_lens, input_ids.device)  # (n,)
    total = int(sum(seq_lens))
    hooks = _rows_only(layer.mlp, rows, total) + _rows_only(layer.self_attn.o_proj, rows, total)
    try:
        h = flat_hidden_states(model, input_ids, seq_lens, last_query_layer=layer.self_attn.layer_idx)  # (1, N, H)
    finally:
        for hook in hooks:
            hook.remove()
    return h[0, rows]  # (n, H)


def last_positions(seq_lens: Sequence[int], device=None) -> torch.Tensor:
    """Index (n,) of each sequence's last token in the flat row."""
    return torch.tensor(list(seq_lens), device=device).cumsum(0) - 1


def cumulative(seq_lens: Sequence[int]) -> torch.Tensor:
    """(n + 1,) int32 on the host: 0, then the running sum of ``seq_lens`` (flash's ``cu_seqlens``)."""
    out = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(list(seq_lens), dtype=torch.int32).cumsum(0)
    return out


def flat_positions(seq_lens: Sequence[int]) -> torch.Tensor:
    """(N,) int64 on the host: 0 .. n_i - 1 for every sequence, laid end to end (one op, not one per sequence)."""
    lens = torch.tensor(list(seq_lens), dtype=torch.long)
    starts = lens.cumsum(0) - lens  # (n,)
    return torch.arange(int(lens.sum())) - starts.repeat_interleave(lens)
