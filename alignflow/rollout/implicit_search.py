"""Beam search on the DPO policy's implicit reward ("From r to Q*"; the reward in
``alignflow.algorithms.implicit_reward``).

At every step each unfinished beam proposes its ``expand`` most likely next tokens under the policy; a candidate's
score is its prefix's implicit reward plus the new token's ``β·(log π − log π_ref)``; the ``width`` best candidates
(finished beams compete with their final score) are kept. The answer is the best beam at the end. With ``expand`` = 1
this is greedy decoding of the policy, scored. Every step recomputes both models on the whole prefix (no KV cache):
a tool for small models and short answers, not a serving path. docs/implicit_reward.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor


@dataclasses.dataclass
class Beam:
    tokens: list[int]  # the response so far
    score: float  # Σ β·(log π − log π_ref) over those tokens
    finished: bool = False


def _next_logps(model: Any, prompt: list[int], beams: list[Beam]) -> Tensor:
    """(n_beams, V) next-token log-probs of ``model`` after prompt + each beam (right-padded, masked)."""
    rows = [prompt + b.tokens for b in beams]
    longest = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
    att = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    last = torch.tensor([len(r) - 1 for r in rows])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits.float()  # (n, T, V)
    return torch.log_softmax(logits[torch.arange(len(rows)), last], dim=-1)


def implicit_reward_beam_search(
    policy: Any,
    ref: Any,
    prompt: list[int],
    *,
    eos_id: int,
    beta: float = 0.1,
    width: int = 4,
    expand: int = 4,
    max_new_tokens: int = 32,
) -> list[Beam]:
    """The ``width`` beams of highest implicit reward for ``prompt`` (token ids), best first."""
    if width < 1 or expand < 1 or max_new_tokens < 1:
        raise ValueError(
            f"implicit_reward_beam_search: width, expand and max_new_tokens must be >= 1, got "
            f"{width}, {expand}, {max_new_tokens}"
        )
    beams = [Beam([], 0.0)]
    for _ in range(max_new_tokens):
        live = [b for b in beams if not b.finished]
        if not live:
            break
        lp, ref_lp = _next_logps(policy, prompt, live), _next_logps(ref, prompt, live)  # (n, V) each
        candidates = [b for b in beams if b.finished]
        top = lp.topk(min(expand, lp.shape[-1]), dim=-1).indices  # (n, expand)
        for i, b in enumerate(live):
            for tok in top[i].tolist():
                r = beta * float(lp[i, tok] - ref_lp[i, tok])
                candidates.append(Beam(b.tokens + [tok], b.score + r, tok == eos_id))
        beams = sorted(candidates, key=lambda c: c.score, reverse=True)[:width]
    return beams
