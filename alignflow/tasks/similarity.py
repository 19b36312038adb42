"""Similarity judgements on the ``reviews`` task, for QDHF (docs/qdhf.md).

A simulated judge says which of two reviews is more like a reference review. Its hidden notion of how reviews
differ is two measures of a review, each scaled to about [0, 1] by its range::

    tone    the gold reward's sentiment term, in (-2, 2)       -> (tone + 2) / 4
    length  tokens of the review (prompt opening + response)   -> min(length, 48) / 48

x2 is judged more similar to the reference than x1 when its scaled (tone, length) point is nearer (Euclidean);
exact ties go to x1. QDHF never sees these measures: it learns its own descriptors from the judgements, on the
bag-of-words counts of the reviews (:func:`bow_features`, one count per word of the task's vocabulary).
"""

from __future__ import annotations

import random

import torch

from alignflow.tasks import reviews

MAX_LENGTH = 48
WORDS = {w: i for i, w in enumerate(reviews.VOCAB)}


def true_measures(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """(N, 2) scaled (tone, length) of each review: the judge's hidden measures (module docstring)."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        tone = reviews.gold_components(p, r)["sentiment"]
        n = len(reviews.review_tokens(p, r))
        out.append([(tone + reviews.SENTIMENT_BOUND) / (2 * reviews.SENTIMENT_BOUND), min(n, MAX_LENGTH) / MAX_LENGTH])
    return torch.tensor(out)


def bow_features(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """(N, V) word counts of each review over the task's vocabulary (unknown tokens are not counted)."""
    out = torch.zeros(len(prompts), len(WORDS))
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        for tok in reviews.review_tokens(p, r):
            if tok in WORDS:
                out[i, WORDS[tok]] += 1
    return out


def judge_triplets(measures: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random triplets (ref, x1, x2) of distinct samples, (n, 3) indices, and the judge's labels (n,): +1 when
    x2 is nearer the reference in ``measures`` (N, K), else -1."""
    rng, count = random.Random(seed), measures.shape[0]
    if count < 3:
        raise ValueError(f"similarity judgements need at least 3 samples, got {count}")
    idx = torch.tensor([rng.sample(range(count), 3) for _ in range(n)])
    ref, a, b = measures[idx[:, 0]], measures[idx[:, 1]], measures[idx[:, 2]]
    y = torch.where((ref - b).pow(2).sum(-1) < (ref - a).pow(2).sum(-1), 1.0, -1.0)
    return idx, y
