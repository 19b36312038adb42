"""Gold-labelled preference pairs from a policy's samples: the synthetic setup of the built-in tasks, shared by
``alignflow demo`` and the built-in data of ``alignflow po``."""

from __future__ import annotations

import math
import random

from alignflow.tasks.common import bt_prefers_first


def label_pairs(prompts: list[str], samples: list[list[str]], gold, noise: float, seed: int) -> list[dict]:
    """Disjoint pairs of distinct samples per prompt (2 pairs from 4 samples), each labelled by a BT draw on the
    gold reward: P(a preferred to b) = sigmoid((gold(a) - gold(b)) / noise).

    Each row also keeps ``p_gold`` = P(chosen is preferred) under the BT model, for the accuracy ceiling.
    """
    rng = random.Random(seed)
    rows = []
    for p, ss in zip(prompts, samples, strict=False):
        distinct = list(dict.fromkeys(s for s in ss if s.strip()))
        for a, b in zip(distinct[0::2], distinct[1::2], strict=False):
            ga, gb = gold([p, p], [a, b])
            first = bt_prefers_first(rng, ga, gb, noise)
            chosen, rejected, gc, gr = (a, b, ga, gb) if first else (b, a, gb, ga)
            p_c = float(gc > gr) if noise == 0 else 1 / (1 + math.exp(-(gc - gr) / noise))
            rows.append({"prompt": p, "chosen": chosen, "rejected": rejected, "p_gold": p_c})
    return rows
