"""The recipe's own data steps: stages that move data between commands and train nothing.

* ``select`` (:func:`select_rows`): the rows of a JSONL file whose fields match regular expressions, optionally
  with their fields renamed, written to ``<output_dir>/rows.jsonl`` -- e.g. the ``*`` problems of the arithmetic
  task's prompts, for an RL stage on one domain (Nemotron-Cascade's domain-wise stages), or the chosen answers of
  preference pairs as SFT rows (``fields: {prompt: prompt, completion: chosen}``).
* ``annotate`` (:func:`annotate`): UltraFeedback-style annotation. Several policies have answered the same prompts
  (each an ``alignflow eval`` stage with ``data.path`` set to the prompts; its ``samples.jsonl``), a judge rates every
  answer, and each prompt's answers become one ``rated`` row (``rated.jsonl``) and at most one preference pair
  (``pairs.jsonl``). Judges: ``gold`` (the built-in task's hidden gold reward), ``attributes`` (the task's
  per-attribute ratings -- reviews: sentiment, fluency, variety, length; arithmetic: correct, well_formed -- whose
  mean is the overall score, as UltraFeedback averages its four aspects), or ``rm_score`` (the score of the reward
  model the eval stages were given as ``reward_model``). Binarisation: ``best_random`` (the best-rated answer is
  chosen, one of the strictly lower-rated ones drawn at random is rejected: how Zephyr binarised UltraFeedback) or
  ``best_worst`` (the lowest-rated one is rejected: ``alignflow.data.formats.rated_to_pairs``). Identical answers
  from two policies count once and empty answers are left out (counted); a prompt whose answers all score within
  ``min_gap`` gives no pair and is counted.
  ``annotate.json`` holds the counts, each policy's mean score and how often its answer was chosen.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignflow.config import ConfigError, DataConfig, ModelConfig, TaskConfig, field
from alignflow.data.formats import DataError
from alignflow.data.pipeline import prepare_data
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.rollout.implicit_search import implicit_reward_beam_search
from alignflow.tasks import build_task, get_task
from alignflow.tasks.arithmetic import accuracy_reward, format_reward
from alignflow.tasks.reviews import attribute_ratings
from alignflow.tasks.weak_signals import SIGNALS, agreement, heron_relabel


@dataclasses.dataclass
class SelectConfig:
    """Recipe step ``select``: rows of ``input`` whose fields match ``where`` (regular expressions, all must match
    with re.search), written to ``<output_dir>/rows.jsonl``."""

    input: str = field("", doc="JSONL file to read (e.g. ${stages.sft.output}/task/prompts.jsonl).")
    where: dict[str, str] = field(default_factory=dict, doc="field -> regular expression, e.g. {prompt: '[*]'}.")
    fields: dict[str, str] = field(
        default_factory=dict,
        doc="Output field -> input field, e.g. {prompt: prompt, completion: chosen}; empty keeps every field.",
    )
    output_dir: str = field("runs/select", doc="Where rows.jsonl is written (set by the recipe).")


@dataclasses.dataclass
class HeronConfig:
    """Recipe step ``heron``: relabel the preference pairs of ``input`` by HERON's hierarchical comparison of the
    reviews task's weak signals (alignflow/tasks/weak_signals.py); ties are dropped. Writes pairs.jsonl, heron.json."""

    input: str = field("", doc="Preference pairs of the reviews task (e.g. ${stages.sft.output}/task/pairs.jsonl).")
    margins: list[float] = field(
        default_factory=lambda: [0.5, 0.3, 0.5, 0.5],
        doc="Margin per signal (fluency, sentiment, variety, length): smaller differences do not decide.",
    )
    output_dir: str = field("runs/heron", doc="Where pairs.jsonl and heron.json are written (set by the recipe).")


@dataclasses.dataclass
class ImplicitSearchConfig:
    """Recipe step ``implicit_search``: answer the built-in task's held-out prompts by beam search on a DPO policy's
    implicit reward (docs/implicit_reward.md) and by greedy decoding of the same policy; both scored by the gold
    reward. Writes samples.jsonl and implicit_search.json."""

    policy: str = field("", doc="The DPO-trained policy's model directory.")
    reference: str = field("", doc="The reference it was trained against (same tokenizer).")
    beta: float = field(0.1, doc="The beta the policy was trained with.", range=(0.0, None))
    width: int = field(4, doc="Beams kept.", range=(1, None))
    expand: int = field(4, doc="Next tokens each beam proposes (the policy's most likely).", range=(1, None))
    max_new_tokens: int = field(40, doc="Most tokens per answer.", range=(1, None))
    num_prompts: int = field(32, doc="Held-out prompts answered.", range=(1, None))
    task: TaskConfig = field(default_factory=TaskConfig, doc="The built-in task (prompts and gold reward).")
    output_dir: str = field("runs/implicit_search", doc="Where the files are written (set by the recipe).")


@dataclasses.dataclass
class AnnotateConfig:
    """Recipe step ``annotate``: several policies' samples rated by a judge and binarised into preference pairs."""

    samples: list[str] = field(
        default_factory=list,
        doc="One entry per policy: an eval stage's directory (or its samples.jsonl); at least two.",
    )
    judge: str = field(
        "gold",
        doc="gold: the task's gold reward; attributes: the task's attribute ratings, overall "
        "= their mean; rm_score: the eval stages' reward_model scores.",
        choices=("gold", "attributes", "rm_score"),
    )
    pairing: str = field(
        "best_random",
        doc="best_random: best vs a random lower-rated answer (Zephyr's "
        "UltraFeedback binarisation); best_worst: best vs worst.",
        choices=("best_random", "best_worst"),
    )
    min_gap: float = field(
        0.0, doc="A pair needs a score gap above this; prompts without one give no pair.", range=(0.0, None)
    )
    task: TaskConfig = field(default_factory=TaskConfig, doc="The built-in task whose judge rates (gold, attributes).")
    seed: int = field(0, doc="Seed of the best_random draw.")
    output_dir: str = field(
        "runs/annotate", doc="Where rated.jsonl, pairs.jsonl and annotate.json are written (set by the recipe)."
    )


def _read_jsonl(path: Path, key: str) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist (run the stage that writes it first)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def select_rows(cfg: SelectConfig) -> dict[str, int]:
    """``select``: write the matching rows; DataError when none match (an empty stage would train on nothing)."""

    try:
        patterns = {k: re.compile(str(v)) for k, v in cfg.where.items()}
    except re.error as e:
        raise ConfigError(f"where: not a valid regular expression ({e})") from None
    rows = _read_jsonl(Path(cfg.input), "input")
    for i, row in enumerate(rows, 1):
        missing = [k for k in [*patterns, *cfg.fields.values()] if k not in row]
        if missing:
            raise DataError(f"{cfg.input}, row {i}: no field {missing[0]!r} (named in where or fields)")
    kept = [r for r in rows if all(p.search(str(r[k])) for k, p in patterns.items())]
    if cfg.fields:
        kept = [{new: r[old] for new, old in cfg.fields.items()} for r in kept]
    if not kept:
        raise DataError(f"{cfg.input}: no row matches where={cfg.where} ({len(rows)} rows read)")
    _write_jsonl(Path(cfg.output_dir) / "rows.jsonl", kept)
    return {"rows": len(kept), "read": len(rows)}


def _arithmetic_attributes(prompt: str, response: str) -> dict[str, float]:
    return {"correct": accuracy_reward([prompt], [response])[0], "well_formed": format_reward([prompt], [response])[0]}


def _reviews_attributes(prompt: str, response: str) -> dict[str, float]:
    return {k: float(v) for k, v in attribute_ratings(prompt, response).items()}


ATTRIBUTE_JUDGES: dict[str, Callable[[str, str], dict[str, float]]] = {
    "reviews": _reviews_attributes,
    "arithmetic": _arithmetic_attributes,
}


def _judge(cfg: AnnotateConfig) -> Callable[[str, list[str], list[dict]], list[dict[str, float]]]:
    """f(prompt, answers, their sample records) -> one ratings dict per answer."""
    if cfg.judge == "rm_score":
        return lambda prompt, answers, recs: [{"rm_score": float(r["rm_score"])} for r in recs]
    if cfg.judge == "attributes":
        if cfg.task.name not in ATTRIBUTE_JUDGES:
            raise ConfigError(
                f"judge: attributes -- task {cfg.task.name!r} has no attribute ratings (tasks with "
                f"them: {', '.join(ATTRIBUTE_JUDGES)}); use judge=gold"
            )
        rate = ATTRIBUTE_JUDGES[cfg.task.name]
        return lambda prompt, answers, recs: [rate(prompt, a) for a in answers]

    gold = get_task(cfg.task.name).gold_reward
    return lambda prompt, answers, recs: [{"gold": float(g)} for g in gold([prompt] * len(answers), answers)]


def gather(cfg: AnnotateConfig, empty: list[int]) -> dict[str, list[dict]]:
    """prompt -> its distinct non-empty answers across the policies, each ``{"text", "policy", "rm_score"?}``;
    ``empty[0]`` counts the empty answers left out."""
    if len(cfg.samples) < 2:
        raise ConfigError(
            f"samples: annotation compares several policies; give at least two eval stages' "
            f"directories, got {len(cfg.samples)}"
        )
    by_prompt: dict[str, list[dict]] = {}
    for k, entry in enumerate(cfg.samples):
        path = Path(entry)
        path = path / "samples.jsonl" if path.is_dir() else path
        for i, row in enumerate(_read_jsonl(path, f"samples[{k}]"), 1):
            if cfg.judge == "rm_score" and "rm_score" not in row:
                raise ConfigError(
                    f"judge: rm_score -- {path}, row {i} has no rm_score; give its eval stage a reward_model"
                )
            answers = by_prompt.setdefault(row["prompt"], [])
            for j, text in enumerate(row["samples"]):
                if not str(text).strip():  # an empty answer cannot be a side of a pair; counted in annotate.json
                    empty[0] += 1
                elif all(a["text"] != text for a in answers):
                    answers.append(
                        {"text": text, "policy": k, **({"rm_score": row["rm_score"][j]} if "rm_score" in row else {})}
                    )
    return by_prompt


def binarise(scores: list[float], pairing: str, min_gap: float, rng: random.Random) -> tuple[int, int] | None:
    """(chosen, rejected) indices: the best score against a random strictly lower one (``best_random``) or the
    lowest (``best_worst``; the first of equals either way); None when no score is more than ``min_gap`` below."""
    best = max(range(len(scores)), key=scores.__getitem__)
    lower = [i for i, s in enumerate(scores) if scores[best] - s > min_gap]
    if not lower:
        return None
    if pairing == "best_worst":
        return best, min(lower, key=scores.__getitem__)
    return best, rng.choice(lower)


def annotate(cfg: AnnotateConfig) -> dict[str, Any]:
    """``annotate``: rated.jsonl, pairs.jsonl and annotate.json in ``cfg.output_dir`` (module docstring)."""

    judge, rng = _judge(cfg), random.Random(cfg.seed)
    rated, pairs, no_pair, empty = [], [], 0, [0]
    score_sum, score_n, chosen_of = [0.0] * len(cfg.samples), [0] * len(cfg.samples), [0] * len(cfg.samples)
    for prompt, answers in gather(cfg, empty).items():
        if not answers:
            no_pair += 1
            continue
        ratings = judge(prompt, [a["text"] for a in answers], answers)
        scores = [sum(r.values()) / len(r) for r in ratings]
        rated.append(
            {
                "prompt": prompt,
                "completions": [a["text"] for a in answers],
                "ratings": ratings,
                "policies": [a["policy"] for a in answers],
            }
        )
        for a, s in zip(answers, scores, strict=True):
            score_sum[a["policy"]] += s
            score_n[a["policy"]] += 1
        picked = binarise(scores, cfg.pairing, cfg.min_gap, rng) if len(answers) > 1 else None
        if picked is None:
            no_pair += 1
            continue
        c, r = picked
        chosen_of[answers[c]["policy"]] += 1
        pairs.append(
            {
                "prompt": prompt,
                "chosen": answers[c]["text"],
                "rejected": answers[r]["text"],
                "score_chosen": scores[c],
                "score_rejected": scores[r],
            }
        )
    if not pairs:
        raise DataError(f"annotate: no prompt's answers differ by more than min_gap={cfg.min_gap:g}; no pairs")
    out = Path(cfg.output_dir)
    _write_jsonl(out / "rated.jsonl", rated)
    _write_jsonl(out / "pairs.jsonl", pairs)
    summary = {
        "prompts": len(rated),
        "pairs": len(pairs),
        "prompts_without_pair": no_pair,
        "empty_answers": empty[0],
        "judge": cfg.judge,
        "policy_mean_score": [s / max(1, n) for s, n in zip(score_sum, score_n, strict=True)],
        "policy_chosen_fraction": [c / len(pairs) for c in chosen_of],
    }
    (out / "annotate.json").write_text(json.dumps(summary, indent=1))
    return summary


def heron(cfg: HeronConfig) -> dict[str, Any]:
    """``heron``: the relabelled pairs and the counts (pairs kept, ties, pairs decided by each signal, agreement of the
    old and the new labels with the gold reward)."""

    if len(cfg.margins) != len(SIGNALS) or any(m < 0 for m in cfg.margins):
        raise ConfigError(
            f"margins: give {len(SIGNALS)} non-negative numbers ({', '.join(SIGNALS)}), got {cfg.margins}"
        )
    rows = _read_jsonl(Path(cfg.input), "input")
    for i, row in enumerate(rows, 1):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{cfg.input}, row {i}: field {missing[0]!r} missing or not a string (heron reads pairs)")
    pairs, stats = heron_relabel(rows, tuple(cfg.margins))
    if not pairs:
        raise DataError(f"{cfg.input}: every pair is a tie under margins={cfg.margins}; no pairs")
    stats |= {"gold_agreement_before": agreement(rows), "gold_agreement_after": agreement(pairs)}
    _write_jsonl(Path(cfg.output_dir) / "pairs.jsonl", pairs)
    (Path(cfg.output_dir) / "heron.json").write_text(json.dumps(stats, indent=1))
    return stats


def implicit_search(cfg: ImplicitSearchConfig) -> dict[str, Any]:
    """``implicit_search``: gold reward and implicit reward of the beam-search and the greedy answers."""
    import torch

    if not cfg.policy or not cfg.reference:
        raise ConfigError("policy and reference: implicit_search needs both model directories")
    out = Path(cfg.output_dir)
    art = build_task(cfg.task.name, cfg.task, out / "task")
    tok = load_tokenizer(cfg.policy)
    rows = prepare_data(
        DataConfig(path=str(art.eval_prompts_path), format="prompt", eval_fraction=0.0), tok, expect=("prompt",)
    ).train[: cfg.num_prompts]
    cpu = torch.device("cpu")
    policy, ref = (load_causal_lm(ModelConfig(name_or_path=p), cpu).eval() for p in (cfg.policy, cfg.reference))
    samples, scores = [], {"beam": [], "greedy": []}
    for r in rows:
        row = {"prompt": r["prompt"]}
        for name, width, expand in (("beam", cfg.width, cfg.expand), ("greedy", 1, 1)):
            best = implicit_reward_beam_search(
                policy,
                ref,
                list(r["prompt_ids"]),
                eos_id=tok.eos_token_id,
                beta=cfg.beta,
                width=width,
                expand=expand,
                max_new_tokens=cfg.max_new_tokens,
            )[0]
            text = tok.decode(best.tokens, skip_special_tokens=True)
            gold = float(art.gold_reward([r["prompt"]], [text])[0])
            row[name] = {"response": text, "implicit_reward": best.score, "gold_reward": gold}
            scores[name].append((best.score, gold))
        samples.append(row)
    _write_jsonl(out / "samples.jsonl", samples)
    summary = {
        f"{name}/{key}": sum(s[i] for s in v) / len(v)
        for name, v in scores.items()
        for i, key in enumerate(("implicit_reward", "gold_reward"))
    }
    (out / "implicit_search.json").write_text(json.dumps(summary | {"prompts": len(rows)}, indent=1))
    return summary
