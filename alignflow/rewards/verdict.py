"""Verdict-accuracy rule reward of a generative reward model (Think-RM, ``docs/thinkrm.md``).

A generative reward model reads two responses, reasons, and ends with a verdict naming the better one. Its RL
stage rewards the verdict alone: 1.0 when the LAST verdict in the output names the row's ``label``, else 0.0.
Two verdict forms are read:

* ``overall this`` / ``overall that`` -- the built-in ``reviews`` judge data (``alignflow.tasks.reviews_judge``):
  ``this`` is the first review of the judge prompt, ``that`` the second;
* ``Verdict: A`` / ``Verdict: B`` -- the pairwise template of the LLM judges (``alignflow.rewards.judge``).

Labels are written the same way (``this`` / ``that`` or ``A`` / ``B``, any case). A response without a verdict
is a wrong answer and scores 0.0 -- the policy is to learn to give one; :func:`verdict_metrics` counts such
rows (``parse_failures``) so a run can tell "wrong" from "no verdict". A label that is not one of the four
words is bad data and raises :class:`~alignflow.data.formats.DataError` naming the row.
"""

from __future__ import annotations

import re

from alignflow.data.formats import DataError

_PATTERN = re.compile(r"\boverall\s+(this|that)\b|verdict[\*_\s]*[:=][\*_\s]*\[?\s*(a|b)\b", re.IGNORECASE)
FIRST, SECOND = "first", "second"
POSITIONS = ("this", "that")  # first and second response of a judge prompt; also the verdict words
VERDICT_WORD = "overall"  # the verdict is "overall this ." / "overall that ."
_POSITION = {"this": FIRST, "a": FIRST, "that": SECOND, "b": SECOND}


def parse_position(text: str) -> str | None:
    """``"first"`` / ``"second"`` for the LAST verdict in ``text`` (either form), None when there is none."""
    found = _PATTERN.findall(text)
    if not found:
        return None
    word = found[-1][0] or found[-1][1]
    return _POSITION[word.lower()]


def label_position(label: object, row: int) -> str:
    """The position a row's label names; a label outside this/that/A/B raises ``DataError`` naming the row."""
    pos = _POSITION.get(str(label).strip().lower())
    if pos is None:
        raise DataError(f"verdict_accuracy: row {row}: label {label!r} is not one of this, that, A, B")
    return pos


def verdict_accuracy(prompts: list, responses: list, labels: list) -> list:
    """1.0 per response whose last verdict names its row's label, else 0.0 (no verdict counts as wrong)."""
    if not (len(prompts) == len(responses) == len(labels)):
        raise ValueError(f"verdict_accuracy: {len(prompts)} prompts, {len(responses)} responses, {len(labels)} labels")
    pairs = enumerate(zip(responses, labels, strict=True))
    return [float(parse_position(r) == label_position(lab, i)) for i, (r, lab) in pairs]


def verdict_metrics(responses: list, labels: list) -> dict:
    """accuracy (a missing verdict counts as wrong), parse_failures (fraction without a verdict) and n."""
    n = len(responses)
    parsed = [parse_position(r) for r in responses]
    correct = sum(p == label_position(lab, i) for i, (p, lab) in enumerate(zip(parsed, labels, strict=True)))
    return {"accuracy": correct / max(n, 1), "parse_failures": sum(p is None for p in parsed) / max(n, 1), "n": n}
