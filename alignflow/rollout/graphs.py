"""The lean decode step captured in CUDA graphs: one graph launch per decode step instead of ~20 kernel
launches per layer.

Why: at batch 256 a 0.5B model's decode step reads ~1 GB of weights (~0.3 ms on an H200) but issues ~500
kernels from Python (~5 ms of launch overhead), so an eager decode loop runs at a few percent of the memory
bandwidth. A CUDA graph replays the recorded kernels with one launch.

What a graph needs, and how :class:`GraphedLeanRunner` provides it on top of
:class:`~alignflow.rollout.lean.LeanRunner`:

* static shapes: the live batch shrinks as rows end, so one graph is captured per live-batch BUCKET (powers of
  two, at least :data:`MIN_BUCKET`); a step of b live rows runs the graph of the smallest bucket >= b, and rows
  b .. bucket-1 compute throw-away values (their inputs are stale but valid token ids and positions);
* static addresses: tokens, positions and the decode column are copied into buffers the graph reads; the KV
  cache and the attention mask are updated in place (compaction moves rows inside them, never reallocates);
* no Python-int shapes: the step attends over the whole cache capacity, the columns not yet written masked
  with -inf (``allowed``), and writes its keys/values at the column held in a device tensor;
* RoPE from a table of cos/sin for every position of the run (computed once by the model's own rotary
  module), so the rope types whose angles depend only on the position (default, linear, llama3, yarn) are
  exact; a rope that rescales with the sequence length (dynamic, longrope) keeps the eager step.

Sampling stays eager (it reads the graph's static logits buffer right after each replay). The graphs live for
one ``generate`` call: the cache and the (possibly changed) weights are those of that call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from alignflow.rollout.lean import LeanRunner, _rms_norm, _signed_sin

MIN_BUCKET = 8
STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})
USE_GRAPHS = True  # False keeps the eager decode step on CUDA (the reference in tests/test_gpu.py)


def graphs_supported(model: Any) -> str | None:
    """Why the decode step cannot be graphed for ``model`` (None when it can)."""
    if not USE_GRAPHS:
        return "CUDA graphs are switched off (alignflow.rollout.graphs.USE_GRAPHS)"
    if not torch.cuda.is_available() or model.lm_head.weight.device.type != "cuda":
        return "the model is not on a CUDA device"
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope type {rope!r} depends on the sequence length"
    return None


def bucket(b: int) -> int:
    """The graph size that serves b live rows: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, b - 1).bit_length())


class GraphedLeanRunner(LeanRunner):
    """:class:`LeanRunner` whose ``step`` replays a CUDA graph per live-batch bucket (see the module docstring).
    Same interface; same numbers as the eager step up to the attention kernel's summation over the masked
    columns (tests/test_gpu.py compares them)."""

    def __init__(self, model: Any, width: int, max_new: int, fuse: bool | None = None) -> None:
        super().__init__(model, width, max_new, fuse)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: torch.cuda._POOL_HANDLE | None = None  # memory pool shared by the graphs
        self.rows = 0
        self.capture = True

    def start(self, prompt_mask: torch.Tensor) -> None:
        super().start(prompt_mask)
        rows, device = prompt_mask.shape[0], prompt_mask.device
        self.rows = rows
        self.capture = prompt_mask.is_cuda  # elsewhere (CPU tests) the same static step runs eagerly
        # the whole mask: select() narrows self.allowed to the live rows, a bucket may reach past them
        self.mask_all = self._allowed()
        self.mask_all[:, self.width :] = float("-inf")  # columns are opened one per step, inside the graph
        for layer in self.layers:  # unwritten columns are attended with weight 0: they must hold no NaN
            keys, values = layer.kv()
            keys[:, :, self.width :].zero_()
            values[:, :, self.width :].zero_()
        self.token = torch.zeros(rows, dtype=torch.long, device=device)  # static inputs of every graph
        self.position = torch.zeros(rows, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        positions = torch.arange(self.capacity, device=device)[None]  # (1, capacity)
        probe = self.embed.weight[:1]
        cos, sin = self.rotary(probe[None].expand(1, self.capacity, -1), positions)  # (1, capacity, D)
        self.cos_table, self.sin_table = cos[0], _signed_sin(sin[0])  # (capacity, D)

    def _graph_step(self, b: int) -> torch.Tensor:
        """The decode step of rows 0..b-1 with shapes fixed by b: what the graphs record."""
        h = self.embed(self.token[:b])  # (b, hidden)
        pos = self.position[:b]
        cos, sin = self.cos_table[pos][:, None], self.sin_table[pos][:, None]  # (b, 1, D)
        self.mask_all[:b].index_fill_(1, self.column, 0.0)
        mask = self.mask_all[:b, None, None, :]  # (b, 1, 1, capacity)
        for layer in self.layers:
            x = _rms_norm(h, layer.norm1, layer.eps1)
            q, k, v = layer.qkv(x, self.heads, self.kv_heads, self.dim, cos, sin)  # (b, H, D)
            keys, values = layer.kv()
            keys[:b].index_copy_(2, self.column, k[:, :, None].to(keys.dtype))
            values[:b].index_copy_(2, self.column, v[:, :, None].to(values.dtype))
            out = self._attend(q, keys[:b], values[:b], mask)
            h = layer.mlp(h + F.linear(out, layer.w_o, layer.b_o))
        return self._logits(h)  # (b, V)

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (as torch's docs require), then record the step of b rows. The warm-up
        runs with the current inputs and writes what the replay writes again (idempotent)."""
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]  # torch leaves Stream() unannotated
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._graph_step(b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._graph_step(b)
        return graph, out

    def step(self, token: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
        b = token.shape[0]
        size = min(bucket(b), self.rows)
        self.token[:b].copy_(token)
        self.position[:b].copy_(position)
        self.column.fill_(self.width + t)
        if not self.capture:
            return self._graph_step(size)[:b]
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:b]
