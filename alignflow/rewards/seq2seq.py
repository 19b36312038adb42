"""Token-level rewards from a rewrite (seq2seq reward model; ``docs/seq2seq_rm.md``).

A seq2seq reward model reads a response and writes a better version of it. How much of the response survives
the rewrite is the reward, token by token: the response and its rewrite are aligned with a longest-matching-
blocks edit alignment (``difflib.SequenceMatcher``, no junk heuristic), and each response token gets

    keep     (default  0.0)   the token is kept in the rewrite
    delete   (default -1.0)   the rewrite drops it
    replace  (default -1.0)   the rewrite puts other tokens in its place
    insert   (default -0.5)   added to the token just before a place where the rewrite inserts tokens the
                              response lacks (to the first token when the insertion is at the start)

An insertion after a token adds to whatever that token already got. The sequence reward is the sum.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


def edit_token_rewards(
    response: Sequence[str],
    rewrite: Sequence[str],
    keep: float = 0.0,
    delete: float = -1.0,
    replace: float = -1.0,
    insert: float = -0.5,
) -> list[float]:
    """One reward per token of ``response`` from its alignment with ``rewrite`` (module docstring)."""
    out = [0.0] * len(response)
    if not response:
        return out
    matcher = difflib.SequenceMatcher(a=list(response), b=list(rewrite), autojunk=False)
    for op, i1, i2, _j1, _j2 in matcher.get_opcodes():
        if op == "insert":
            out[max(i1 - 1, 0)] += insert
            continue
        value = {"equal": keep, "delete": delete, "replace": replace}[op]
        for i in range(i1, i2):
            out[i] += value
    return out
