"""Rewrite data of the ``reviews`` task: the training rows of a seq2seq reward model (``docs/seq2seq_rm.md``).

``build_task("reviews", ...)`` writes ``rewrite_sft.jsonl`` (``ROWS_PER_PAIR * task.num_pairs`` rows on train
openings) and ``rewrite_eval.jsonl`` (``EVAL_ROWS`` rows on held-out openings), ``{"prompt", "completion",
"source_prompt", "response"}`` rows for ``alignflow sft``: the prompt is :func:`rewrite_prompt` of a task prompt
and a response, the completion is the better response the rewriter should write.

Each row starts from an original: a grammatical review in the positive tone (the task's gold reward prefers a
positive, fluent review without repeats; the opening may be of any tone). With probability ``DAMAGE`` the response
shown is a damaged copy and the completion is the original, so the rewrite undoes the damage:

* :func:`sour` (``SOUR`` of the damaged rows): one or two positive words turned negative (same word class);
* :func:`echo` (``ECHO``): one sentence said twice, the repeated clauses a policy falls into;
* otherwise one of the damages the task's preference pairs carry (a repeated word, a missing final stop, a cut,
  two swapped words, appended praise, rambling: the task's own ``_degrade``).

Otherwise the response is the original itself and the completion repeats it, so a good response is left
unchanged (its token rewards are then all ``keep``). Copying is what the rewriter must learn first, and it needs
many distinct reviews: a few thousand rows seen for many epochs are memorised instead (``docs/seq2seq_rm.md``).

Departure from "rejected -> chosen": the task's preference pairs are two independent samples of the same
opening, so rewriting a rejected one into its chosen one would teach the rewriter to write an unrelated review
and every token would count as replaced. A damaged copy and its original differ only where the damage is.
"""

from __future__ import annotations

from pathlib import Path

from alignflow.config import TaskConfig
from alignflow.tasks import reviews
from alignflow.tasks.common import task_rng, write_jsonl

FILES = {"rewrite_sft": "rewrite_sft.jsonl", "rewrite_eval": "rewrite_eval.jsonl"}
TEMPLATE = "{prompt} {response} {prompt}"  # reward.seq2seq.template's default: every word is in the vocabulary
DAMAGE = 0.5  # share of rows that show a damaged copy
SOUR, ECHO = 0.4, 0.2  # shares of the damaged rows soured and echoed (the rest: the task's own damages)
ROWS_PER_PAIR = 8  # training rows per task.num_pairs: copying needs many distinct reviews, not epochs of few
EVAL_ROWS = 200
TONE = "positive"  # the tone of every original: the better review of the task's gold reward is a positive one


def rewrite_prompt(prompt: str, response: str, template: str = TEMPLATE) -> str:
    """The rewriter's input for a (prompt, response): the template filled in."""
    return template.format(prompt=prompt, response=response)


def sour(rng, tail: list) -> list:
    """One or two positive sentiment words of ``tail`` (adjective, opinion verb, opener) each replaced by a negative
    word of the same class; unchanged when it has none."""
    tail = list(tail)
    spots = [i for i, t in enumerate(tail) if reviews.SENTIMENT.get(t, 0.0) > 0]
    for i in rng.sample(spots, k=min(len(spots), rng.randint(1, 2))):
        cls = next(c for c in ("ADJ", "OPV", "OPEN") if tail[i] in reviews.CLASSES[c])
        tail[i] = rng.choice(reviews._POLAR[cls][2])
    return tail


def echo(rng, tail: list) -> list:
    """One sentence of ``tail`` (split at "." / "!"; the first may continue the opening) said again right after
    itself: the repeated clauses a policy falls into."""
    parts = reviews.sentences(tail)
    i = rng.randrange(len(parts))
    return [t for p in parts[: i + 1] for t in p] + parts[i] + [t for p in parts[i + 1 :] for t in p]


def _damage(rng, tail: list) -> list:
    u = rng.random()
    if u < SOUR:
        return sour(rng, tail)
    return echo(rng, tail) if u < SOUR + ECHO else reviews._degrade(rng, tail)


def _original(rng, split: str, seed: int) -> tuple:
    """(opening, tail) of a grammatical positive review whose opening is on ``split``."""
    while True:
        opening = reviews._opening(rng, split, seed, full=False)[0]
        try:
            full = reviews.sample_review(rng, TONE, tuple(opening))
        except RuntimeError:  # an opening the positive tone cannot finish within the length bounds
            continue
        return opening, full[len(opening) :]


def rewrite_rows(cfg: TaskConfig, split: str, n: int) -> list:
    """``n`` rewrite rows on ``split`` openings (module docstring); deterministic in ``cfg.seed``."""
    rng = task_rng(reviews.NAME, cfg.seed, f"rewrite_{split}")
    rows = []
    for _ in range(n):
        opening, tail = _original(rng, split, cfg.seed)
        shown = list(tail)
        if rng.random() < DAMAGE:
            shown = _damage(rng, tail)
        prompt, response = reviews.as_prompt(opening), reviews.as_completion(shown)
        rows.append(
            {
                "prompt": rewrite_prompt(prompt, response),
                "completion": reviews.as_completion(tail),
                "source_prompt": prompt,
                "response": response,
            }
        )
    return rows


def write_files(cfg: TaskConfig, task_dir: Path) -> None:
    """Write the rewrite files into a ``reviews`` task directory."""
    write_jsonl(Path(task_dir) / FILES["rewrite_sft"], rewrite_rows(cfg, "train", ROWS_PER_PAIR * cfg.num_pairs))
    write_jsonl(Path(task_dir) / FILES["rewrite_eval"], rewrite_rows(cfg, "eval", EVAL_ROWS))
