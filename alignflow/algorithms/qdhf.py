"""QDHF, quality diversity through human feedback (Ding et al. 2024; docs/qdhf.md): diversity descriptors learned
from similarity judgements, and a MAP-Elites archive over them that keeps the best sample of each descriptor cell.

* descriptor: a linear projection z = W f of a sample's features f (no bias), K = 2 dimensions;
* triplet loss on a judgement (ref, x1, x2) with y = +1 when x2 was judged more similar to ref, else -1::

      delta = ||z_ref - z_1||^2 - ||z_ref - z_2||^2,    L = mean max(0, m - y * delta),   m = 0.05

* archive: the descriptor range is cut into ``bins`` cells per dimension; each sample goes to its cell, and a cell
  keeps its highest-quality sample (MAP-Elites' elitism). Selecting the archive's elites gives one good sample per
  kind of sample, where best-of-n gives the n best, often all of one kind.
"""

from __future__ import annotations

import torch
from torch import Tensor


def triplet_loss(
    z_ref: Tensor, z1: Tensor, z2: Tensor, y: Tensor, margin: float = 0.05
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean hinge ``max(0, margin - y * delta)`` over (B, K) descriptors; ``y`` (B,) in {+1, -1}. Metrics:
    ``qdhf/triplet_accuracy`` (fraction with y * delta > 0)."""
    delta = (z_ref - z1).pow(2).sum(-1) - (z_ref - z2).pow(2).sum(-1)  # (B,)
    loss = torch.clamp(margin - y * delta, min=0.0).mean()
    return loss, {"qdhf/triplet_accuracy": (y * delta > 0).float().mean()}


def cell_index(desc: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """(N,) flat cell of each (N, K) descriptor in a grid of ``bins`` cells per dimension over [lo, hi] (values
    outside go to the edge cells)."""
    scaled = ((desc - lo) / (hi - lo).clamp_min(1e-12) * bins).floor().long().clamp(0, bins - 1)  # (N, K)
    weights = bins ** torch.arange(desc.shape[1] - 1, -1, -1)  # row-major: first dimension slowest
    return (scaled * weights).sum(-1)


def map_elites(desc: Tensor, quality: Tensor, lo: Tensor, hi: Tensor, bins: int) -> list[int]:
    """Indices of the archive's elites: the highest-quality sample of each occupied cell (first index on ties),
    ordered by cell."""
    cells = cell_index(desc, lo, hi, bins).tolist()
    best: dict[int, int] = {}
    for i, (c, q) in enumerate(zip(cells, quality.tolist(), strict=True)):
        if c not in best or q > float(quality[best[c]]):
            best[c] = i
    return [best[c] for c in sorted(best)]


def coverage(desc: Tensor, lo: Tensor, hi: Tensor, bins: int) -> int:
    """How many distinct cells the (N, K) descriptors occupy (a diversity measure)."""
    return len(set(cell_index(desc, lo, hi, bins).tolist()))


def spread(points: Tensor) -> float:
    """Mean Euclidean distance over the distinct pairs of (N, K) points (0 for fewer than 2): a diversity measure."""
    n = points.shape[0]
    if n < 2:
        return 0.0
    return float(torch.cdist(points, points).sum() / (n * (n - 1)))


# ------------------------------------------------------------------------------------- QDHF inside RL (issue 16)
def group_novelty(desc: Tensor, groups: list[list[int]], scale: Tensor) -> Tensor:
    """(N,) novelty of each sample against the other samples of its group: the mean distance between its
    descriptor and theirs, each dimension divided by ``scale`` (K,) (the archive's range), so that a unit is one
    archive width. A group of one has novelty 0. For points 0, 3, 4 on one axis (scale 1): 3.5, 2, 2.5."""
    z = desc / scale.clamp_min(1e-12)
    out = torch.zeros(desc.shape[0], dtype=desc.dtype)
    for rows in groups:
        if len(rows) < 2:
            continue
        idx = torch.tensor(rows)
        d = torch.cdist(z[idx], z[idx])  # (G, G), 0 on the diagonal
        out[idx] = d.sum(1) / (len(rows) - 1)
    return out


def archive_novelty(cells: Tensor, seen: set[int]) -> Tensor:
    """(N,) 1.0 for a sample whose cell was not in ``seen`` before this batch, else 0.0; ``seen`` then gains the
    batch's cells (an occupancy archive kept across steps by the caller)."""
    out = torch.tensor([0.0 if int(c) in seen else 1.0 for c in cells.tolist()])
    seen.update(int(c) for c in cells.tolist())
    return out


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams of whitespace tokens over all n-grams of ``texts`` (0 when there are none): a plain
    diversity measure that needs no descriptor."""
    grams = [tuple(t[i : i + n]) for t in (x.split() for x in texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def qd_select(desc: Tensor, quality: Tensor, lo: Tensor, hi: Tensor, bins: int, k: int) -> list[int]:
    """Quality-diversity selection of ``k`` of n samples: the MAP-Elites archive's elites, best quality first; when
    fewer than ``k`` cells are occupied, the best remaining samples fill the rest. Best-of-k takes the ``k`` best by
    quality alone."""
    elites = sorted(map_elites(desc, quality, lo, hi, bins), key=lambda i: -float(quality[i]))
    rest = [i for i in quality.argsort(descending=True, stable=True).tolist() if i not in set(elites)]
    return (elites + rest)[:k]
