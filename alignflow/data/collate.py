"""Turning tokenised examples into model inputs: packing and token-budget micro-batches.

Two ways to avoid padding waste, both exact (the loss does not depend on which one is used):

* **Packing** (`pack`): several sequences share one row. Position ids restart at every sample and
  the attention mask is a 4-D block-diagonal causal mask ``(B, 1, T, T)`` so that no token attends
  across a sample boundary. (Restarting ``position_ids`` alone is NOT enough under ``sdpa``/``eager``
  attention in transformers: later samples would attend to earlier ones. Checked by a test.)
* **Length-sorted padding** (`token_budget_groups` + `pad_batch`): rows sorted by length and grouped under
  a token budget, right-padded, with an ordinary 2-D mask.
* **Padding-free rows** (`flatten`): the sequences laid end to end in ONE row ``(1, N)`` with their lengths
  ``seq_lens``; no mask at all -- the model runs them through :mod:`alignflow.models.varlen`, whose attention
  works per sequence. No pad token is computed and no (T, T) mask is built, so on a CPU this is the fastest
  of the three (``docs/benchmarks.md``); `unflatten` turns such a row back into a padded batch for models the
  varlen attention does not support.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin-pack item indices by length into bins of at most ``capacity`` tokens (first fit, longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"a sequence of {lengths[i]} tokens does not fit a pack of {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids (-1 = padding) -> (B, 1, T, T) bool mask: causal and within the same segment."""
    B, T = segment_ids.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()  # (T, T)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    mask = same & causal[None] & (segment_ids >= 0)[:, :, None]
    # A padding query row that sees nothing makes sdpa return NaN; let padding attend to itself only.
    eye = torch.eye(T, dtype=torch.bool, device=segment_ids.device)[None] & (segment_ids < 0)[:, :, None]
    return (mask | eye)[:, None]  # (B, 1, T, T)


def pack(examples: Sequence[dict], capacity: int, pad_id: int, keys: Sequence[str] = ("loss_mask",)) -> dict:
    """Pack examples (each with ``input_ids`` and the per-token lists in ``keys``) into rows of ``capacity``.

    Returns ``input_ids`` (B, T), ``position_ids`` (B, T), ``attention_mask`` (B, 1, T, T) bool,
    ``segment_ids`` (B, T) and each of ``keys`` (B, T), 0 on padding. T is the longest packed row.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    bins = first_fit_decreasing(lengths, capacity)
    T = max(sum(lengths[i] for i in b) for b in bins)
    B = len(bins)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    extra = {k: torch.zeros(B, T, dtype=torch.long) for k in keys}
    for r, b in enumerate(bins):
        start = 0
        for s, i in enumerate(b):
            n = lengths[i]
            ids[r, start : start + n] = torch.tensor(examples[i]["input_ids"])
            pos[r, start : start + n] = torch.arange(n)
            seg[r, start : start + n] = s
            for k in keys:
                extra[k][r, start : start + n] = torch.tensor(examples[i][k])
            start += n
    return {
        "input_ids": ids,
        "position_ids": pos,
        "segment_ids": seg,
        "attention_mask": block_causal_mask(seg),
        **extra,
    }


def pad_right(seqs: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """List of int lists -> (B, T) right-padded long tensor."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


def pad_batch(examples: Sequence[dict], pad_id: int, keys: Sequence[str] = ("loss_mask",)) -> dict:
    """Right-pad examples into ``input_ids`` (B, T), ``attention_mask`` (B, T) and each of ``keys``."""
    ids = pad_right([e["input_ids"] for e in examples], pad_id)
    mask = pad_right([[1] * len(e["input_ids"]) for e in examples], 0)
    return {"input_ids": ids, "attention_mask": mask, **{k: pad_right([e[k] for e in examples], 0) for k in keys}}


def token_budget_groups(lengths: Sequence[int], budget: int, sort: bool = True) -> list[list[int]]:
    """Group indices so that ``rows * longest_row <= budget`` in each group (length-sorted when ``sort``).

    A single row longer than the budget still forms its own group (the budget is a performance knob).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort else list(range(len(lengths)))
    groups: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if cur and new_longest * (len(cur) + 1) > budget:
            groups.append(cur)
            cur, new_longest = [], lengths[i]
        cur.append(i)
        longest = new_longest
    if cur:
        groups.append(cur)
    return groups


def flatten(examples: Sequence[dict], keys: Sequence[str] = ("loss_mask",)) -> dict:
    """Lay examples end to end: ``input_ids``, ``position_ids`` (restarting at 0) and each of ``keys``, all
    (1, N) with N the total token count, plus ``seq_lens`` (a list of the n lengths, in order)."""
    if not examples:
        raise ValueError("flatten needs at least one example")
    lens = [len(e["input_ids"]) for e in examples]
    if min(lens) < 1:
        raise ValueError(f"example {lens.index(min(lens))} has no tokens")
    ids = torch.tensor([t for e in examples for t in e["input_ids"]], dtype=torch.long)[None]  # (1, N)
    pos = torch.tensor([p for n in lens for p in range(n)], dtype=torch.long)[None]  # (1, N)
    extra = {k: torch.tensor([t for e in examples for t in e[k]], dtype=torch.long)[None] for k in keys}  # (1, N)
    return {"input_ids": ids, "position_ids": pos, "seq_lens": lens, **extra}


def unflatten(flat: dict, pad_id: int, keys: Sequence[str] = ("loss_mask",)) -> dict:
    """A :func:`flatten` row back to a right-padded batch (``input_ids``, 2-D ``attention_mask``, ``keys``)."""
    lens = flat["seq_lens"]

    def rows(t: torch.Tensor) -> list[list[int]]:
        return [r.tolist() for r in t[0].split(lens)]

    return {
        "input_ids": pad_right(rows(flat["input_ids"]), pad_id),
        "attention_mask": pad_right([[1] * n for n in lens], 0),
        **{k: pad_right(rows(flat[k]), 0) for k in keys},
    }


def token_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group holds at most ``budget`` tokens (real tokens: for
    :func:`flatten`, where nothing is padded). A single longer item forms its own group."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if not groups or total + n > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups
