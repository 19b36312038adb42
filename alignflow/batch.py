"""``Batch``: the one data container that crosses role boundaries.

A dict of tensors that share their first dimension (rows), plus per-row Python objects (texts,
metadata) kept in ``meta`` as lists of the same length. Every operation keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


class Batch:
    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, meta: dict[str, list[Any]] | None = None):
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.meta: dict[str, list[Any]] = {k: list(v) for k, v in (meta or {}).items()}
        sizes = {k: v.shape[0] for k, v in self.tensors.items()} | {k: len(v) for k, v in self.meta.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Batch fields disagree on the number of rows: {sizes}")

    # -------------------------------------------------------------- access
    def __len__(self) -> int:
        for v in self.tensors.values():
            return v.shape[0]
        for rows in self.meta.values():
            return len(rows)
        return 0

    def __getitem__(self, key: str) -> Any:
        if key in self.tensors:
            return self.tensors[key]
        if key in self.meta:
            return self.meta[key]
        raise KeyError(f"Batch has no field {key!r}; it has {sorted(self.keys())}")

    def __setitem__(self, key: str, value: Any) -> None:
        if (
            len(self)
            and (value.shape[0] if torch.is_tensor(value) else len(value)) != len(self)
            and self.keys() != {key}
        ):
            raise ValueError(f"field {key!r} has {len(value)} rows, the batch has {len(self)}")
        if torch.is_tensor(value):
            self.meta.pop(key, None)
            self.tensors[key] = value
        else:
            self.tensors.pop(key, None)
            self.meta[key] = list(value)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors or key in self.meta

    def keys(self) -> set[str]:
        return set(self.tensors) | set(self.meta)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        return f"Batch(rows={len(self)}, tensors={shapes}, meta={sorted(self.meta)})"

    # -------------------------------------------------------------- transforms
    def select(self, index: Sequence[int] | torch.Tensor) -> Batch:
        """Rows at ``index`` (a list of ints, an index tensor, or a boolean mask)."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            idx = idx.nonzero(as_tuple=True)[0]
        idx = idx.long()
        rows = idx.tolist()
        return Batch(
            {k: v[idx.to(v.device)] for k, v in self.tensors.items()},
            {k: [v[i] for i in rows] for k, v in self.meta.items()},
        )

    def split(self, size: int) -> list[Batch]:
        """Consecutive chunks of at most ``size`` rows."""
        if size <= 0:
            raise ValueError("split size must be positive")
        return [self.select(list(range(s, min(s + size, len(self))))) for s in range(0, len(self), size)]

    def chunk(self, n: int) -> list[Batch]:
        """``n`` near-equal consecutive chunks (for data-parallel ranks)."""
        base, extra = divmod(len(self), n)
        out, start = [], 0
        for i in range(n):
            stop = start + base + (1 if i < extra else 0)
            out.append(self.select(list(range(start, stop))))
            start = stop
        return out

    @staticmethod
    def cat(batches: Iterable[Batch]) -> Batch:
        """Concatenate rows. Tensors with a different second dimension are right-padded with 0."""
        batches = [b for b in batches]
        if not batches:
            return Batch()
        keys = batches[0].keys()
        for b in batches[1:]:
            if b.keys() != keys:
                raise ValueError(f"cannot cat batches with different fields: {sorted(keys)} vs {sorted(b.keys())}")
        tensors = {}
        for k in batches[0].tensors:
            parts = [b.tensors[k] for b in batches]
            if parts[0].dim() >= 2 and len({p.shape[1] for p in parts}) > 1:
                width = max(p.shape[1] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, width - p.shape[1])) for p in parts]
            tensors[k] = torch.cat(parts, 0)
        meta = {k: [x for b in batches for x in b.meta[k]] for k in batches[0].meta}
        return Batch(tensors, meta)

    def repeat(self, n: int, interleave: bool = True) -> Batch:
        """Each row ``n`` times: ``interleave`` gives a a b b (groups stay together), else a b a b."""
        rows = list(range(len(self)))
        idx = [i for i in rows for _ in range(n)] if interleave else rows * n
        return self.select(idx)

    def to(self, device: torch.device | str) -> Batch:
        return Batch({k: v.to(device) for k, v in self.tensors.items()}, self.meta)

    def union(self, other: Batch) -> Batch:
        """Fields of both (same rows); fields of ``other`` win."""
        if len(self) and len(other) and len(self) != len(other):
            raise ValueError(f"union of batches with {len(self)} and {len(other)} rows")
        return Batch(self.tensors | other.tensors, self.meta | other.meta)


# per-row measures a role leaves in a Batch (a sampler's group statistics, a reward source's diagnostics): the RL
# trainer logs each one's mean over the batch as rollout/<name>
ROW_METRIC = "metric/"
PROMPT_SIDE = ("prompt_ids", "prompt_mask", "input_ids", "attention_mask", "position_ids")  # left-padded columns


def cat_rollouts(batches: list[Batch]) -> Batch:
    """Concatenate rollout batches whose prompt widths differ: prompt-side columns are LEFT-padded to the widest
    prompt first (``Batch.cat`` right-pads, which suits the response side only)."""
    width = max(b["prompt_ids"].shape[1] for b in batches)
    fixed = []
    for b in batches:
        extra = width - b["prompt_ids"].shape[1]
        if extra:
            b = Batch(dict(b.tensors), b.meta)
            for k in PROMPT_SIDE:
                b.tensors[k] = torch.nn.functional.pad(b.tensors[k], (extra, 0))  # (B, extra + T) zeros on the left
        fixed.append(b)
    return Batch.cat(fixed)
