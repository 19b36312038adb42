"""RLMT's reward-side stripping (docs/rlmt.md): a policy that thinks before it answers is rewarded on the answer
only, so the reward sources see the text after the thinking.

``answer_part(text, after, before, strict)``: the text after the first ``after`` delimiter (e.g. ``</think>`` for
``<think> plan </think> answer``), cut at the first ``before`` delimiter that follows it (e.g. ``</response>``),
stripped of surrounding whitespace. A response without ``after`` is left as it is, or, with ``strict``, replaced by
``[NULL]`` so that a badly formatted response is scored as such.
"""

from __future__ import annotations

NULL_ANSWER = "[NULL]"
# the token columns of a rollout batch: dropped once the response text is cut, so that every source scores the text
TOKEN_FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "response_ids",
    "response_mask",
    "input_ids",
    "attention_mask",
    "position_ids",
)


def answer_part(text: str, after: str, before: str = "", strict: bool = False) -> str:
    """The answer of a think-then-answer response (module docstring); ``after`` empty returns ``text`` unchanged."""
    if not after:
        return text
    _, found, tail = text.partition(after)
    if not found:
        return NULL_ANSWER if strict else text
    if before:
        tail = tail.partition(before)[0]
    return tail.strip()


def answers(responses: list[str], after: str, before: str = "", strict: bool = False) -> list[str]:
    """:func:`answer_part` of every response."""
    return [answer_part(r, after, before, strict) for r in responses]
