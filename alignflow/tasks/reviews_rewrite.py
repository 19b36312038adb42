"""Rewrite data of the ``reviews`` task: the training rows of a seq2seq reward model (``docs/seq2seq_rm.md``).

``build_task("reviews", ...)`` writes ``rewrite_sft.jsonl`` (train openings) and ``rewrite_eval.jsonl`` (held-out
openings), ``{"prompt", "completion", "source_prompt", "response"}`` rows for ``alignflow sft``: the prompt is
:func:`rewrite_prompt` of a task prompt and a response, the completion is the better response the rewriter
should write.

Each row starts from a grammatical review drawn like the task's pairs (an opening, then a review in a random
tone). With probability ``DAMAGE`` the response shown is a copy with one of the damages the task's preference
pairs carry (a repeated word, a missing final stop, a cut, two swapped words, appended praise, rambling: the
task's own ``_degrade``) and the completion is the undamaged review: the rewrite undoes the damage. Otherwise
the response is the review itself and the completion repeats it, so a good response is left unchanged (its
token rewards are then all ``keep``).

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
DAMAGE = 0.5
EVAL_ROWS = 200


def rewrite_prompt(prompt: str, response: str, template: str = TEMPLATE) -> str:
    """The rewriter's input for a (prompt, response): the template filled in."""
    return template.format(prompt=prompt, response=response)


def rewrite_rows(cfg: TaskConfig, split: str, n: int) -> list:
    """``n`` rewrite rows on ``split`` openings (module docstring); deterministic in ``cfg.seed``."""
    rng = task_rng(reviews.NAME, cfg.seed, f"rewrite_{split}")
    rows = []
    for _ in range(n):
        opening, full = reviews._opening(rng, split, cfg.seed)
        tail = full[len(opening) :]
        shown = reviews._degrade(rng, tail) if rng.random() < DAMAGE else list(tail)
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
    write_jsonl(Path(task_dir) / FILES["rewrite_sft"], rewrite_rows(cfg, "train", cfg.num_pairs))
    write_jsonl(Path(task_dir) / FILES["rewrite_eval"], rewrite_rows(cfg, "eval", EVAL_ROWS))
