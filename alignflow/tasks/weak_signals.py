"""Weak feedback signals of ranked importance on the ``reviews`` task, for HERON (docs/heron.md).

Each review gets four signals, each one of the terms of the task's hidden gold reward (``reviews.attribute_ratings``;
their sum is the gold reward), ranked by how much an expert would weigh them::

    1. fluency     -(bad sentences, missing final punctuation)   a broken review is bad whatever it says
    2. sentiment   bounded sentiment of the review
    3. variety     -(repeated content words)
    4. length      -(words past the length limit)

``heron_relabel`` replaces the labels of preference pairs by HERON's hierarchical comparison of these signals
(``alignflow.algorithms.heron``): no weights between the signals are used, only their order and a margin per signal
below which the signal is too weak to decide. Ties give no pair. ``agreement`` measures a set of pairs against the
noise-free gold reward.
"""

from __future__ import annotations

import torch

from alignflow.algorithms.heron import heron_level_counts, heron_preference
from alignflow.tasks.reviews import attribute_ratings, gold_reward

SIGNALS = ("fluency", "sentiment", "variety", "length")  # most important first
MARGINS = (0.5, 0.3, 0.5, 0.5)  # δ_k: smaller differences of signal k do not decide


def weak_signals(prompt: str, response: str) -> list[float]:
    """The four signals of one review, in ``SIGNALS`` order."""
    ratings = attribute_ratings(prompt, response)
    return [float(ratings[name]) for name in SIGNALS]


def heron_relabel(pairs: list[dict], margins: tuple[float, ...] = MARGINS) -> tuple[list[dict], dict]:
    """(pairs whose chosen side HERON prefers, ties dropped; stats). Stats: ``pairs`` kept, ``ties`` and
    ``decided_by`` (how many pairs each signal decided, in ``SIGNALS`` order)."""
    if not pairs:
        return [], {"pairs": 0, "ties": 0, "decided_by": dict.fromkeys(SIGNALS, 0)}
    a = torch.tensor([weak_signals(p["prompt"], p["chosen"]) for p in pairs])  # (B, K)
    b = torch.tensor([weak_signals(p["prompt"], p["rejected"]) for p in pairs])
    label, level = heron_preference(a, b, torch.tensor(margins))
    out = []
    for p, lab in zip(pairs, label.tolist(), strict=True):
        if lab == 1:
            out.append({"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]})
        elif lab == -1:
            out.append({"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]})
    counts = heron_level_counts(level, len(SIGNALS))
    return out, {"pairs": len(out), "ties": counts[-1], "decided_by": dict(zip(SIGNALS, counts[:-1], strict=True))}


def agreement(pairs: list[dict]) -> float:
    """Fraction of pairs whose chosen side has the higher gold reward (ties count as disagreement)."""
    if not pairs:
        return 0.0
    chosen = gold_reward([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = gold_reward([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)
