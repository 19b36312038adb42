"""Constraint judges and a tone-only reward for CGPO on the ``reviews`` task (``alignflow cgpo``, ``docs/cgpo.md``).

Each judge is a plain function ``fn(prompts, responses) -> list[bool]``, True when the review (the prompt's
opening plus the response) satisfies the constraint, so a config names it by its dotted path, e.g.
``cgpo.rule_judges: {grammatical: "alignflow.tasks.reviews_constraints:grammatical"}``. They read the task's
gold features (:func:`alignflow.tasks.reviews.gold_components`):

* ``grammatical`` -- every sentence parses (``bad_sentences == 0``);
* ``no_repeats`` -- no content word is used twice (``repeats == 0``);
* ``finished`` -- the review ends with ``.`` or ``!``;
* ``length`` -- 8 to 40 tokens.

:func:`tone` is a reward that sees only the sentiment term of the gold reward. It stands for a reward model
that learned the tone of a review and nothing about its form; with it, the judges are the only thing that keeps
the policy from buying tone with broken or repetitive reviews, which is the situation CGPO is for.
"""

from __future__ import annotations

from alignflow.tasks import reviews


def _holds(prompts: list, responses: list, key: str) -> list[bool]:
    if len(prompts) != len(responses):
        raise ValueError(f"{key}: {len(prompts)} prompts but {len(responses)} responses")
    return [reviews.gold_components(p, r)[key] == 0 for p, r in zip(prompts, responses, strict=True)]


def grammatical(prompts: list, responses: list, **_) -> list[bool]:
    """True where every sentence of the review parses."""
    return _holds(prompts, responses, "bad_sentences")


def no_repeats(prompts: list, responses: list, **_) -> list[bool]:
    """True where no content word of the review appears twice."""
    return _holds(prompts, responses, "repeats")


def finished(prompts: list, responses: list, **_) -> list[bool]:
    """True where the review ends with a full stop or an exclamation mark."""
    return _holds(prompts, responses, "no_final_punct")


def length(prompts: list, responses: list, **_) -> list[bool]:
    """True where the review is MIN_LEN..MAX_LEN tokens long."""
    return _holds(prompts, responses, "length_excess")


def tone(prompts: list, responses: list, **_) -> list[float]:
    """The sentiment term of the gold reward alone (in (-SENTIMENT_BOUND, SENTIMENT_BOUND))."""
    if len(prompts) != len(responses):
        raise ValueError(f"tone: {len(prompts)} prompts but {len(responses)} responses")
    return [reviews.gold_components(p, r)["sentiment"] for p, r in zip(prompts, responses, strict=True)]
