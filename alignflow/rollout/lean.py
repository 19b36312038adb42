"""A lean forward for Llama-family decoders (llama, mistral, qwen2, qwen3): the fast path of ``HFEngine``.

Why: at the sizes the online trainers run on CPU (hidden 256, 4 layers, batch 64) a Hugging Face forward
spends a good part of each decode step in Python (module calls, mask building, cache bookkeeping, output
dataclasses) rather than in matmuls. This module runs the same computation with plain tensor ops on the
model's own parameters:

* the projections read the model's weights. For small models (Q/K/V + gate/up weights up to
  :data:`FUSE_MAX_BYTES`) Q/K/V and gate/up are fused into one matmul each; the fused weights are
  ``torch.cat`` copies made by :class:`LeanRunner`, i.e. at every ``generate`` call, so an actor whose
  weights change between calls is always read fresh. A fused matmul gives the same bits as the separate ones;
* RMSNorm, the model's own activation (``mlp.act_fn``), residuals in the HF modules' order;
* RoPE: cos/sin come from the model's own rotary module, called with the same position ids as the HF
  forward, so every rope type it implements (linear, dynamic, llama3, yarn, ...) is reproduced;
* a static KV cache per layer, ``(B, H_kv, prompt + max_new, D)``, allocated once; rows that end are dropped
  by refilling their slots with live rows from the tail (only the moved rows are copied);
* attention is ``scaled_dot_product_attention`` called as transformers' ``sdpa`` integration calls it (at
  decode, the query heads of a KV head as that head's "query positions"; at prefill, repeated KV heads and
  a causal + padding mask), so the numbers are the same;
* prefill runs the linear layers on the real prompt tokens only (no left-padding rows) and, in the last
  layer, the attention output and MLP only for each prompt's last token (the other positions were needed
  for their keys and values only).

In float32 and under bf16 autocast, tokens and sampling log-probs are bit-identical to the HF forward's
(tests/test_rollout.py: llama with GQA, qwen2 with Q/K/V biases, qwen3 with q/k norms, mistral, scaled RoPE).
Anything this module does not reproduce falls back to the HF forward: see :func:`unsupported_reason`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from alignflow.models import varlen
from alignflow.models.varlen import cumulative, flash_usable, flash_varlen

# model_type -> the causal-LM class this module was written against (transformers 5.x).
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# Fuse Q/K/V and gate/up only when those weights total at most this: the fused copies are rebuilt at every
# generate call (the actor's weights change between calls), which is cheap for the small models where a
# saved op per layer matters, and a waste of memory and time for large ones (where it does not).
FUSE_MAX_BYTES = 64 * 2**20


def _is_rms_norm(module: object) -> bool:
    return (
        module is not None
        and type(module).__name__.endswith("RMSNorm")
        and hasattr(module, "weight")
        and hasattr(module, "variance_epsilon")
    )


def unsupported_reason(model: Any, capacity: int) -> str | None:
    """Why the lean forward cannot run ``model`` for ``capacity`` cache positions, or None when it can.

    It runs only the exact classes in :data:`SUPPORTED` (a PEFT wrapper or any other architecture falls back),
    only when every projection is a plain ``nn.Linear`` (LoRA-injected, quantised or otherwise replaced
    layers fall back), when no accelerate hook moves weights around, when every layer is full attention for
    ``capacity`` positions (a sliding window shorter than that falls back), and in floating point.
    """
    config = getattr(model, "config", None)
    model_type: Any = getattr(config, "model_type", None)
    if SUPPORTED.get(model_type) != type(model).__name__:
        return f"{type(model).__name__} (model_type {model_type!r}) is not one of {sorted(SUPPORTED.values())}"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model does not have the usual model.embed_tokens / layers / norm / rotary_emb layout"
    if (
        type(getattr(model, "lm_head", None)) is not torch.nn.Linear
        or type(base.embed_tokens) is not torch.nn.Embedding
    ):
        return "lm_head is not a plain nn.Linear or embed_tokens is not a plain nn.Embedding"
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "accelerate hooks (offloading / device maps) are attached"
    if not model.lm_head.weight.is_floating_point() or model.lm_head.weight.device.type == "meta":
        return "weights are not floating-point tensors on a real device"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))} include non-full attention"
    window = getattr(config, "sliding_window", None) if model_type == "mistral" else None
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return "a decoder layer lacks self_attn or mlp"
        if any(type(getattr(attn, p, None)) is not torch.nn.Linear for p in _PROJECTIONS) or any(
            type(getattr(mlp, p, None)) is not torch.nn.Linear for p in _MLP
        ):
            return "a projection is not a plain nn.Linear (LoRA, quantisation or a custom layer)"
        window = window or getattr(attn, "sliding_window", None)
        norms = [getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)]
        if model_type == "qwen3":
            norms += [getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]
        if not all(_is_rms_norm(n) for n in norms + [base.norm]):
            return "a norm layer is not the architecture's RMSNorm"
    if window is not None and capacity > window:
        return f"sliding window {window} is shorter than prompt + max_new_tokens = {capacity}"
    return None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in the HF modules' order: float32 statistics, cast back, then the weight."""
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one kernel; bit-identical to the formula below in fp32
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, so that ``rotate_half(x) * sin == swap_halves(x) * signed_sin``
    exactly (``(-a) * b == a * (-b)`` in IEEE arithmetic): one negation per step instead of one per layer."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in HF's order; x (..., heads, D), cos / signed_sin (..., 1, D)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


def _fuse(linears: Sequence[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (weight, bias) for several ``nn.Linear`` on the same input: their outputs side by side (copies)."""
    weight = torch.cat([m.weight for m in linears])
    if all(m.bias is None for m in linears):
        return weight, None
    return weight, torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


class _Layer:
    """References to one decoder layer's parameters; with ``fuse``, fused Q/K/V and gate/up weights (copies,
    made at every ``generate`` call so they are never stale)."""

    def __init__(self, layer: Any, fuse: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.q, self.k, self.v = attn.q_proj, attn.k_proj, attn.v_proj
        self.w_o, self.b_o = attn.o_proj.weight, attn.o_proj.bias
        self.q_norm: Any = getattr(attn, "q_norm", None)  # qwen3: RMSNorm over each head before RoPE
        self.k_norm: Any = getattr(attn, "k_norm", None)
        self.gate, self.up, self.act = mlp.gate_proj, mlp.up_proj, mlp.act_fn
        self.w_down, self.b_down = mlp.down_proj.weight, mlp.down_proj.bias
        self.inter = self.gate.out_features
        self.w_qkv = self.b_qkv = self.w_gu = self.b_gu = None
        if fuse:
            self.w_qkv, self.b_qkv = _fuse([self.q, self.k, self.v])  # (Hq*D + 2*Hkv*D, hidden)
            self.w_gu, self.b_gu = _fuse([self.gate, self.up])  # (2I, hidden)
        self.keys: torch.Tensor | None = None  # (B, Hkv, capacity, D) static cache
        self.values: torch.Tensor | None = None

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The static cache (keys, values); it exists from the prefill on."""
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def qkv(
        self, x: torch.Tensor, heads: int, kv_heads: int, dim: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, hidden) -> q (N, Hq, D), k (N, Hkv, D) with norms and RoPE applied, v (N, Hkv, D)."""
        n = x.shape[0]
        if self.w_qkv is not None:
            qkv = F.linear(x, self.w_qkv, self.b_qkv).view(n, heads + 2 * kv_heads, dim)
            q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]
            if self.q_norm is None:  # q and k rotated together (elementwise: the same numbers)
                qk = _rope(qkv[:, : heads + kv_heads], cos, sin)
                return qk[:, :heads], qk[:, heads:], v
        else:
            q, k, v = (F.linear(x, m.weight, m.bias).view(n, -1, dim) for m in (self.q, self.k, self.v))
        if self.q_norm is not None:
            q = _rms_norm(q, self.q_norm.weight, self.q_norm.variance_epsilon)
            k = _rms_norm(k, self.k_norm.weight, self.k_norm.variance_epsilon)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The residual branch after attention: h + down(act(gate(x)) * up(x)), x = post-attention norm of h."""
        x = _rms_norm(h, self.norm2, self.eps2)
        if self.w_gu is not None:
            gu = F.linear(x, self.w_gu, self.b_gu)
            gate, up = gu[:, : self.inter], gu[:, self.inter :]
        else:
            gate, up = F.linear(x, self.gate.weight, self.gate.bias), F.linear(x, self.up.weight, self.up.bias)
        return h + F.linear(self.act(gate) * up, self.w_down, self.b_down)


class LeanRunner:
    """Prefill + decode of a supported model (check :func:`unsupported_reason` first) with its own KV cache.

    The interface the engine drives (shared with the HF-forward runner in ``engine.py``):
    ``prefill(prompt, prompt_mask, position)`` -> (P, V) float logits of each prompt's last token;
    ``repeat(n)`` -> each prompt's cache rows repeated n times (rows i*n .. i*n+n-1 = prompt i);
    ``step(token, position, t)`` -> (b, V) logits of the live rows after feeding sampled token t;
    ``select(order)`` -> keep rows ``order`` (see ``kv_cache.select_rows`` for its form).
    """

    def __init__(self, model: Any, width: int, max_new: int, fuse: bool | None = None) -> None:
        base = model.model
        config = model.config
        layers = base.layers[: config.num_hidden_layers]
        if fuse is None:  # fusing saves a few small-op calls per layer: worth a copy of small weights only
            fused = sum(
                m.weight.numel() * m.weight.element_size()
                for layer in layers
                for m in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                    layer.mlp.gate_proj,
                    layer.mlp.up_proj,
                )
            )
            fuse = fused <= FUSE_MAX_BYTES
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.final_norm, self.final_eps = base.norm.weight, base.norm.variance_epsilon
        self.lm_head = model.lm_head  # called as a module: forward hooks on it see every logits call
        self.layers = [_Layer(layer, fuse) for layer in layers]
        attn = base.layers[0].self_attn
        self.dim = attn.head_dim
        self.heads = attn.q_proj.out_features // self.dim
        self.kv_heads = attn.k_proj.out_features // self.dim
        self.groups = self.heads // self.kv_heads
        self.scaling = attn.scaling
        self.width, self.capacity = width, width + max_new
        self.allowed: torch.Tensor | None = None  # (b, capacity) additive mask: 0 where a live row attends
        self.n = 1  # samples per prompt (set by `repeat`)
        self.prompt_lengths: list[int] = []  # real tokens per prompt, set by the engine (host copy)

    # ------------------------------------------------------------------------------------------- prefill
    def prefill(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """prompt, prompt_mask, position: (P, Tp) left-padded. Fills cache rows 0..P-1, columns 0..Tp-1."""
        rows, width = prompt.shape
        real = prompt_mask.bool()  # (P, Tp)
        row_of, col_of = real.nonzero(as_tuple=True)  # (N,) each: the real tokens, prompt by prompt
        last = prompt_mask.sum(-1).cumsum(0) - 1  # (P,) flat index of each prompt's last token
        h = self.embed(prompt[row_of, col_of])  # (N, hidden)
        cos, sin = self.rotary(h, position[row_of, col_of][None])  # (1, N, D) each
        cos, sin = cos[0, :, None], _signed_sin(sin[0, :, None])  # (N, 1, D)
        # (P, 1, Tp, Tp) causal & key-padding mask; a padding query row attends to itself only (its output is
        # discarded; this keeps every softmax row finite).
        causal = torch.ones(width, width, dtype=torch.bool, device=prompt.device).tril()
        diagonal = torch.eye(width, dtype=torch.bool, device=prompt.device)
        mask = (causal & (real[:, None, :] | diagonal))[:, None]
        cu: torch.Tensor | None = None
        longest = 0  # the longest prompt, with cu
        if prompt.device.type in varlen.FLASH_DEVICES:  # cumulative prompt lengths, from the engine's host copy
            lengths = self.prompt_lengths or prompt_mask.sum(-1).tolist()
            cu, longest = cumulative(lengths).to(prompt.device, non_blocking=True), max(lengths)
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, layer.norm1, layer.eps1)
            q, k, v = layer.qkv(x, self.heads, self.kv_heads, self.dim, cos, sin)  # (N, H, D)
            # The prompt's keys/values, (P, Hkv, Tp, D), zero (finite) at padding; `start` moves them into the
            # static cache.
            # (Under autocast k and v may differ in dtype, as they do in the HF forward's cache.)
            keys = layer.keys = k.new_zeros(rows, self.kv_heads, width, self.dim)
            values = layer.values = v.new_zeros(rows, self.kv_heads, width, self.dim)
            keys[row_of, :, col_of] = k
            values[row_of, :, col_of] = v
            if cu is not None and flash_usable(q):  # one flash kernel over every prompt's real tokens
                out = flash_varlen(q, k, v, cu, cu, longest, longest, causal=True, scale=self.scaling)  # (N, H, D)
                out = out if i + 1 < len(self.layers) else out[last]  # last layer: each prompt's last token
                h = h if i + 1 < len(self.layers) else h[last]
                h = layer.mlp(h + F.linear(out.reshape(out.shape[0], -1), layer.w_o, layer.b_o))
                continue
            q_pad = q.new_zeros(rows, width, self.heads, self.dim)
            q_pad[row_of, col_of] = q
            if self.groups > 1:  # transformers repeats the KV heads at prefill; so do we
                keys, values = keys.repeat_interleave(self.groups, 1), values.repeat_interleave(self.groups, 1)
            out = F.scaled_dot_product_attention(
                q_pad.transpose(1, 2), keys, values, attn_mask=mask, scale=self.scaling
            ).transpose(1, 2)  # (P, Tp, H, D)
            if i + 1 < len(self.layers):
                out = out[row_of, col_of].reshape(-1, self.heads * self.dim)  # (N, H*D)
            else:  # last layer: only each prompt's last token goes on (the others were needed for K/V only)
                out, h = out[:, -1].reshape(rows, self.heads * self.dim), h[last]
            h = layer.mlp(h + F.linear(out, layer.w_o, layer.b_o))
        return self._logits(h)  # (P, V)

    def repeat(self, n: int) -> None:
        """Each prompt's rows are used n times (rows i*n .. i*n+n-1 = prompt i); :meth:`start` copies them."""
        self.n = n

    def start(self, prompt_mask: torch.Tensor) -> None:
        """Allocate the static cache of the (B, Tp) rows about to be decoded and copy the prompts' keys/values
        into its first Tp columns (each prompt's rows repeated n times); set the attention columns: prompt
        tokens, then all new ones. Columns after Tp are written by :meth:`step` before they are read."""
        rows = prompt_mask.shape[0]
        for layer in self.layers:
            prompt_keys, prompt_values = layer.kv()  # (P, Hkv, Tp, D)
            shape = (rows, self.kv_heads, self.capacity, self.dim)
            layer.keys, layer.values = prompt_keys.new_empty(shape), prompt_values.new_empty(shape)
            for cache, part in ((layer.keys, prompt_keys), (layer.values, prompt_values)):
                grouped = cache.view(-1, self.n, *shape[1:])  # (P, n, Hkv, capacity, D): row i*n+j = (i, j)
                grouped[:, :, :, : self.width] = part[:, None]  # broadcast over the n samples of each prompt
        # Additive float mask (0 / -inf): what SDPA turns a boolean mask into at every call (same results).
        dtype = self.layers[0].kv()[0].dtype
        self.allowed = torch.zeros(rows, self.capacity, dtype=dtype, device=prompt_mask.device)
        self.allowed[:, : self.width].masked_fill_(prompt_mask == 0, float("-inf"))

    # ------------------------------------------------------------------------------------------- decode
    def step(self, token: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
        """Feed token (b,) at position (b,), the t-th generated token (cache column Tp + t); (b, V) logits."""
        b = token.shape[0]
        column = self.width + t
        h = self.embed(token)  # (b, hidden)
        cos, sin = self.rotary(h, position[:, None])  # (b, 1, D) each
        sin = _signed_sin(sin)
        mask = self._allowed()[:, None, None, : column + 1]  # (b, 1, 1, L) additive
        for layer in self.layers:
            x = _rms_norm(h, layer.norm1, layer.eps1)
            q, k, v = layer.qkv(x, self.heads, self.kv_heads, self.dim, cos, sin)  # (b, H, D)
            keys, values = layer.kv()
            keys[:b, :, column] = k
            values[:b, :, column] = v
            out = self._attend(q, keys[:b, :, : column + 1], values[:b, :, : column + 1], mask)
            h = layer.mlp(h + F.linear(out, layer.w_o, layer.b_o))
        return self._logits(h)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One query per row: q (b, Hq, D) over keys/values (b, Hkv, L, D), mask (b, 1, 1, L) -> (b, Hq*D).

        As transformers' sdpa integration does for one query token: the query heads that share a KV head
        are laid out as that head's "query positions", (b, Hkv, groups, D), so KV heads are never repeated.
        """
        b = q.shape[0]
        out = F.scaled_dot_product_attention(
            q.reshape(b, self.kv_heads, self.groups, self.dim), keys, values, attn_mask=mask, scale=self.scaling
        )  # (b, Hkv, groups, D)
        return out.reshape(b, self.heads * self.dim)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(_rms_norm(h, self.final_norm, self.final_eps)).float()
        return logits

    def _allowed(self) -> torch.Tensor:
        """The (b, capacity) additive attention mask; it exists from :meth:`start` on."""
        assert self.allowed is not None
        return self.allowed

    def select(self, order: torch.Tensor) -> None:
        """Keep rows ``order`` (b',): ``order[j]`` is j or a row at/after b' (ended rows refilled from the
        tail), so only the refilled rows are copied; the live prefix of the static cache shrinks to b'."""
        moved = (order != torch.arange(order.shape[0], device=order.device)).nonzero().squeeze(1)
        source = order[moved]
        for layer in self.layers:
            keys, values = layer.kv()
            keys[moved] = keys[source]
            values[moved] = values[source]
        allowed = self._allowed()  # in place (CUDA graphs hold its address), then the live prefix
        allowed[moved] = allowed[source]
        self.allowed = allowed[: order.shape[0]]
