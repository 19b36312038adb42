"""A ``DynamicCache`` whose full-attention layers write into storage allocated once.

transformers' ``DynamicLayer`` grows by ``torch.cat`` at every decode step, copying the whole cache each time:
with a batch of 64 on CPU that copy was half of the decode step's time (bench/results/generate.md). The
layer below allocates ``capacity`` positions up front (prompt + max_new_tokens), writes each step's keys
and values in place and hands attention a view of the filled part. It keeps the rest of the layered cache
API (``batch_select_indices``, ``batch_repeat_interleave``, ``reorder_cache``, ``crop``), and adds
:func:`select_rows`, which drops finished rows by refilling their slots with live rows from the tail (a copy
of the moved rows only) instead of gathering every kept row. Layers of other kinds (sliding window, linear
attention, ...) stay transformers' own.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer with fixed capacity; keys/values are views ``(rows, H, length, D)`` of
    storage ``(B, H, capacity, D)`` allocated at the first update."""

    def __init__(self, capacity: int):
        super().__init__()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
        self.capacity = capacity
        self.length = 0  # filled positions
        self.rows = 0  # live rows: the first `rows` rows of the storage
        self._keys: torch.Tensor | None = None  # (B, H, capacity, D)
        self._values: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        rows, heads = key_states.shape[:2]
        self._set(
            key_states.new_empty(rows, heads, self.capacity, key_states.shape[-1]),
            value_states.new_empty(rows, heads, self.capacity, value_states.shape[-1]),
        )
        self.length = 0
        self._expose()
        self.is_initialized = True

    def _set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._keys, self._values, self.rows = keys, values, keys.shape[0]

    def _storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (keys, values) storage; only called once the layer is initialised (it exists from then on)."""
        assert self._keys is not None and self._values is not None
        return self._keys, self._values

    def _expose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Point ``keys``/``values`` at the filled part of the storage; returns them."""
        keys, values = self._storage()
        self.keys = keys[: self.rows, :, : self.length]  # (rows, H, length, D) view, no copy
        self.values = values[: self.rows, :, : self.length]
        return self.keys, self.values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"PreallocatedLayer: {end} positions exceed the capacity {self.capacity}")
        keys, values = self._storage()
        keys[: self.rows, :, self.length : end] = key_states
        values[: self.rows, :, self.length : end] = value_states
        self.length = end
        return self._expose()

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def reset(self) -> None:
        self._keys = self._values = None
        self.length = self.rows = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self.is_initialized and tokens_to_remove < 0:
            self.length = max(0, self.length + tokens_to_remove)
            self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (any order, repeats allowed): a gathered copy of the storage."""
        if self.is_initialized:
            keys, values = self._storage()
            index = indices.to(keys.device)
            self._set(keys[: self.rows][index], values[: self.rows][index])
            self._expose()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            keys, values = self._storage()
            self._set(
                keys[: self.rows].repeat_interleave(repeats, dim=0),
                values[: self.rows].repeat_interleave(repeats, dim=0),
            )
            self._expose()

    def move_rows(self, order: torch.Tensor, moved: torch.Tensor) -> None:
        """Keep rows ``order`` (b',) in place: only rows ``moved`` (where ``order[j] != j``, all with
        ``order[j] >= b'``) are copied, then the live prefix shrinks to b' rows. Same result as
        ``batch_select_indices(order)`` at a cost proportional to the moved rows, not to all kept rows."""
        if self.is_initialized:
            keys, values = self._storage()
            keys[moved] = keys[order[moved]]
            values[moved] = values[order[moved]]
            self.rows = order.shape[0]
            self._expose()


def select_rows(cache: DynamicCache, order: torch.Tensor) -> None:
    """Keep rows ``order`` of every layer of ``cache``, where ``order[j]`` is ``j`` or a row at or beyond
    ``len(order)`` (the form the engine builds: finished rows inside the kept prefix are refilled from the
    tail). Preallocated layers move only the refilled rows; other layers use ``batch_select_indices``."""
    moved = (order != torch.arange(order.shape[0], device=order.device)).nonzero().squeeze(1)
    for layer in cache.layers:
        if isinstance(layer, PreallocatedLayer):
            layer.move_rows(order, moved)
        else:
            # every layer kind a DynamicCache builds has it; transformers' base class does not declare it
            layer.batch_select_indices(order)  # type: ignore[union-attr]


def preallocated_cache(config: Any, capacity: int) -> DynamicCache:
    """``DynamicCache(config=config)`` with its full-attention layers replaced by :class:`PreallocatedLayer`."""
    cache = DynamicCache(config=config)
    if not cache.layers:  # no per-layer types known: layers are created lazily on first use
        # transformers only calls it, so a factory serves where it expects a layer class
        cache.layer_class_to_replicate = lambda: PreallocatedLayer(capacity)  # type: ignore[assignment]
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = PreallocatedLayer(capacity)
    return cache
