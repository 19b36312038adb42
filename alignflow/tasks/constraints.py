"""Instruction constraints on the ``reviews`` task, for MAPL (docs/mapl.md).

A constrained instruction is the task's prompt preceded by constraint keywords, all words of the task's vocabulary
(so the task's tokenizer reads them without unknown tokens): ``"plot short Review : this cast"`` asks for a review
that mentions the plot and is short. Constraints, each checked by a rule on the response::

    <noun>   the review mentions that noun (one of reviews.NOUNS)
    short    at most SHORT words          long   at least LONG words
    good     positive (more positive than negative words)     bad   negative

``make_mapl_rows`` builds the three kinds of MAPL rows from the task's rated responses (several per prompt):

* ``response``: {prompt, chosen, rejected}: one constrained instruction, an answer that meets all its constraints
  and one that does not;
* ``intra``: {prompt_chosen, prompt_rejected, response}: one answer, an instruction whose constraints it meets and
  one with a constraint it violates;
* ``inter``: {prompt, prompt_plus, chosen, rejected}: a response-level pair, and its instruction with one more
  constraint that the chosen answer meets and the rejected one violates.
"""

from __future__ import annotations

import random

from alignflow.config import TaskConfig
from alignflow.tasks.common import task_rng
from alignflow.tasks.reviews import NEGATIVE, NOUNS, POSITIVE, review_tokens

SHORT, LONG = 14, 22
STYLE = ("short", "long", "good", "bad")


def satisfies(constraint: str, prompt: str, response: str) -> bool:
    """Whether ``response`` (to the task prompt ``prompt``) meets ``constraint``; ValueError for an unknown one."""
    toks = review_tokens(prompt, response)
    if constraint in NOUNS:
        return constraint in toks
    polarity = sum(t in POSITIVE for t in toks) - sum(t in NEGATIVE for t in toks)
    checks = {"short": len(toks) <= SHORT, "long": len(toks) >= LONG, "good": polarity > 0, "bad": polarity < 0}
    if constraint not in checks:
        raise ValueError(f"constraint {constraint!r} is not a noun of the task or one of {', '.join(STYLE)}")
    return checks[constraint]


def constrained(prompt: str, constraints: list[str]) -> str:
    """The instruction: constraint keywords, then the task prompt."""
    return " ".join([*constraints, prompt])


def _met(prompt: str, response: str, pool: list[str]) -> tuple[list[str], list[str]]:
    met = [c for c in pool if satisfies(c, prompt, response)]
    return met, [c for c in pool if c not in met]


def _rows_for(rng: random.Random, prompt: str, answers: list[str]) -> dict[str, list[dict]]:
    """MAPL rows for one prompt and its answers (module docstring); some kinds may be missing."""
    pool = list(STYLE) + rng.sample(NOUNS, 6)
    out: dict[str, list[dict]] = {"response": [], "intra": [], "inter": []}
    y = rng.choice(answers)
    met, unmet = _met(prompt, y, pool)
    if met and unmet:  # intra: same answer, an instruction it meets and one where one constraint is broken
        keep = rng.sample(met, min(len(met), 2))
        out["intra"].append(
            {
                "prompt_chosen": constrained(prompt, keep),
                "prompt_rejected": constrained(prompt, keep[:-1] + [rng.choice(unmet)]),
                "response": y,
            }
        )
    for c in rng.sample(pool, len(pool)):  # response level + inter: a constraint that splits two answers
        good = [a for a in answers if satisfies(c, prompt, a)]
        bad = [a for a in answers if not satisfies(c, prompt, a)]
        if good and bad:
            yw, yl = rng.choice(good), rng.choice(bad)
            out["response"].append({"prompt": constrained(prompt, [c]), "chosen": yw, "rejected": yl})
            shared = [d for d in pool if d != c and satisfies(d, prompt, yw) == satisfies(d, prompt, yl)]
            base = rng.sample(shared, min(len(shared), 1))
            out["inter"].append(
                {
                    "prompt": constrained(prompt, base),
                    "prompt_plus": constrained(prompt, base + [c]),
                    "chosen": yw,
                    "rejected": yl,
                }
            )
            break
    return out


def make_mapl_rows(cfg: TaskConfig, rated_rows: list[dict]) -> dict[str, list[dict]]:
    """The three kinds of MAPL rows from rated rows (``prompt`` + ``completions``, e.g. the task's rated.jsonl)."""
    rng = task_rng("reviews", cfg.seed, "mapl")
    out: dict[str, list[dict]] = {"response": [], "intra": [], "inter": []}
    for row in rated_rows:
        for kind, rows in _rows_for(rng, row["prompt"], list(row["completions"])).items():
            out[kind] += rows
    return out
