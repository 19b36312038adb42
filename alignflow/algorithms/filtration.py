"""Policy filtration (PF-PPO) as pure functions: which sampled rows of a rollout batch the policy trains on.

Shen et al. 2024, "Policy Filtration for RLHF to Mitigate Noise in Reward Models" (PF-PPO, arXiv:2409.06957):
a reward model is more reliable at the ends of its range than in the middle, so each prompt's ``n`` samples are
filtered by their reward before the PPO update and the noisy middle is left out. Modes (``algo.sample_filter``):

============  =============================================================================================
mode          rows kept
============  =============================================================================================
best          per prompt group: the highest-reward sample only (1 row; the paper's BoN filter)
best_worst    per prompt group: the highest-reward and the lowest-reward sample (2 rows; 1 for n = 1)
best_random   per prompt group: the highest-reward sample and one other drawn uniformly (2 rows)
range         over the batch: rows whose reward is <= the ``low`` quantile or >= the ``high`` quantile
============  =============================================================================================

Ties: the best is the first row of the group with the maximum reward, the worst the last row with the minimum,
so a group whose rewards are all equal still gives two distinct rows (when n >= 2).

Reliability (the paper measures it per reward region): :func:`bucket_accuracy` splits rows into reward buckets
by the proxy reward's batch quantiles and, in each bucket, counts how often the proxy orders a row against the
other samples of its prompt the way the gold reward does. Index tensors are int64 (K,), sorted ascending.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor
FILTER_MODES = ("none", "best", "best_worst", "best_random", "range")


def _groups(group_ids: Tensor) -> list[Tensor]:
    """Row indices of each group, in order of first appearance: list of (n_g,) int64."""
    ids = group_ids.tolist()
    order: dict[int, list[int]] = {}
    for i, g in enumerate(ids):
        order.setdefault(g, []).append(i)
    return [torch.tensor(rows, dtype=torch.long) for rows in order.values()]


def _best_and_worst(scores: Tensor, rows: Tensor) -> tuple[int, int]:
    """(first row holding the group's maximum, last row holding its minimum)."""
    s = scores[rows]
    best = int(rows[int(torch.nonzero(s == s.max())[0])])
    worst = int(rows[int(torch.nonzero(s == s.min())[-1])])
    return best, worst


def filter_best(scores: Tensor, group_ids: Tensor) -> Tensor:
    """Per group, the best row only (the first holding the maximum). scores (B,), group_ids (B,) -> (K,)."""
    return torch.tensor(sorted(_best_and_worst(scores, rows)[0] for rows in _groups(group_ids)), dtype=torch.long)


def filter_best_worst(scores: Tensor, group_ids: Tensor) -> Tensor:
    """Per group, the best and the worst row. scores (B,), group_ids (B,) -> kept row indices (K,)."""
    keep: set[int] = set()
    for rows in _groups(group_ids):
        keep.update(_best_and_worst(scores, rows))
    return torch.tensor(sorted(keep), dtype=torch.long)


def filter_best_random(scores: Tensor, group_ids: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per group, the best row and one of the group's other rows drawn uniformly (``generator``) -> (K,)."""
    keep: list[int] = []
    for rows in _groups(group_ids):
        best, _ = _best_and_worst(scores, rows)
        others = [int(r) for r in rows if int(r) != best]
        keep.append(best)
        if others:
            keep.append(others[int(torch.randint(len(others), (1,), generator=generator))])
    return torch.tensor(sorted(keep), dtype=torch.long)


def filter_range(scores: Tensor, low: float, high: float) -> Tensor:
    """Rows with reward <= quantile_low or >= quantile_high of the batch (linear interpolation, as
    ``torch.quantile``); the rows strictly inside the band are dropped. scores (B,) -> (K,)."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"filter_range: need 0 <= low <= high <= 1, got low={low}, high={high}")
    s = scores.detach().float()
    q_low, q_high = torch.quantile(s, low), torch.quantile(s, high)
    return torch.nonzero((s <= q_low) | (s >= q_high)).flatten()


def select_rows(
    mode: str,
    scores: Tensor,
    group_ids: Tensor,
    low: float = 0.25,
    high: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Dispatch on ``mode`` (:data:`FILTER_MODES`); ``none`` keeps every row."""
    if mode == "none":
        return torch.arange(len(scores))
    if mode == "best":
        return filter_best(scores, group_ids)
    if mode == "best_worst":
        return filter_best_worst(scores, group_ids)
    if mode == "best_random":
        return filter_best_random(scores, group_ids, generator)
    if mode == "range":
        return filter_range(scores, low, high)
    raise ValueError(f"unknown sample filter {mode!r}; choose one of {', '.join(FILTER_MODES)}")


def bucket_accuracy(proxy: Tensor, gold: Tensor, group_ids: Tensor, num_buckets: int = 4) -> list[tuple[float, int]]:
    """The proxy reward's pairwise accuracy in each of ``num_buckets`` proxy-reward buckets.

    Bucket k holds the rows whose proxy reward lies between the k/K and (k+1)/K quantiles of the batch (the top
    bucket closed). For a row i of bucket k, every other row j of the same prompt group whose gold reward differs
    from i's forms a pair; the pair is correct when ``sign(proxy_i − proxy_j) = sign(gold_i − gold_j)`` (a proxy
    tie counts as wrong). Returns ``(accuracy, pairs)`` per bucket, accuracy NaN for a bucket without pairs.
    """
    p, g = proxy.detach().double(), gold.detach().double()
    edges = torch.quantile(p, torch.linspace(0, 1, num_buckets + 1, dtype=torch.double))
    bucket = torch.bucketize(p, edges[1:-1], right=True)  # (B,) in 0..K-1
    right, count = [0] * num_buckets, [0] * num_buckets
    for rows in _groups(group_ids):
        for i in rows.tolist():
            for j in rows.tolist():
                if i == j or g[i] == g[j]:
                    continue
                k = int(bucket[i])
                count[k] += 1
                right[k] += int(torch.sign(p[i] - p[j]) == torch.sign(g[i] - g[j]))
    return [(right[k] / count[k] if count[k] else math.nan, count[k]) for k in range(num_buckets)]
