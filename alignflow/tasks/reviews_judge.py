"""Judge data of the ``reviews`` task: rationales with verdicts, principles with yes/no labels, labelled pairs.

``build_task("reviews", ...)`` writes these files next to the task's others (``docs/tasks.md``,
``docs/thinkrm.md``):

* ``judge_sft.jsonl`` -- ``{"prompt", "completion"}``: the judge prompt shows two whole reviews, ``this`` one
  first and ``that`` one second (``Review : <first> Review : <second>``); the completion is a rationale built
  from the gold reward's own features of each review, then the verdict ``overall this .`` or
  ``overall that .``. The verdict is the review with the higher gold reward (ties are left out), so the
  rationale never contradicts it. Every word is in the task's vocabulary, so the tiny model can learn it.
* ``judge_verdict_sft.jsonl`` -- the same prompts with the verdict alone as the completion
  (`` overall this .``): a direct-verdict judge (``configs/judge_sft.yaml``, ``docs/judges.md``).
* ``judge_point_sft.jsonl`` -- ``{"prompt", "completion"}``: a pointwise judge reads ONE whole review (the
  task's ``Review : <opening><response>``) and answers `` overall good .`` when its gold reward is above the median
  of the training reviews' (every chosen and rejected response of the task's pairs), else `` overall bad .``;
  read as p(good) (``reward.judge.verdict: logprob``), it scores a single response (``configs/judge_sft.yaml``).
  Damaged copies follow, each labelled by its own gold reward: about half of the reviews with one of their
  sentences repeated 1-3 times, a quarter with one word stuttered 1-40 more times in place, a quarter with
  ``not`` put after a verb. Each is a way GRPO gamed a judge trained without it (``docs/judges.md``).
* ``judge_pairs.jsonl`` / ``judge_eval.jsonl`` -- ``{"prompt", "label", "source_prompt", "first", "second",
  "gold_first", "gold_second"}``: the same judge prompts with the gold verdict ``label`` (``this`` / ``that``)
  for rule-rewarded RL (train openings) and for evaluation (held-out openings that never appear in training).
* ``principles.jsonl`` -- ``{"prompt", "response", "principle_id", "principle", "label"}``: binary,
  principle-conditioned feedback (RLBFF); ``label`` is ``yes`` / ``no`` from the gold features.

The rationale of one review lists, in this order and only when present: its positive sentiment words, ``but``
and its negative sentiment words (a negated word appears as ``not <word>`` among the negatives), then one
problem word per problem (capped at 3 of a kind): ``stale`` per repeated content word, ``incoherent`` per
sentence that does not parse, ``sloppy`` for a missing final ``.`` / ``!``, ``overlong`` / ``brief`` outside
8-40 tokens. With no word at all it reads ``plain``. Example::

    this : wonderful , stale . that : but boring , incoherent . overall this .
"""

from __future__ import annotations

import random
from pathlib import Path

from alignflow.config import TaskConfig
from alignflow.rewards.verdict import POSITIONS, VERDICT_WORD  # the verdict format the reward reads
from alignflow.tasks import reviews
from alignflow.tasks.common import read_jsonl, task_rng, write_jsonl

FILES = {
    "judge_sft": "judge_sft.jsonl",
    "judge_verdict_sft": "judge_verdict_sft.jsonl",
    "judge_point_sft": "judge_point_sft.jsonl",
    "judge_pairs": "judge_pairs.jsonl",
    "judge_eval": "judge_eval.jsonl",
    "principles": "principles.jsonl",
}
PROBLEM_WORDS = {"repeats": "stale", "bad_sentences": "incoherent", "no_final_punct": "sloppy"}
MAX_PROBLEM_REPEAT = 3
POINT_WORDS = ("bad", "good")  # the pointwise judge's verdicts, lowest first: " overall bad ." / " overall good ."
PRINCIPLES = {  # id -> (text for an LLM judge, the gold features that satisfy it)
    "grammatical": ("Every sentence of the review is grammatical.", lambda c: c["bad_sentences"] == 0),
    "no_repeats": ("The review uses no content word twice.", lambda c: c["repeats"] == 0),
    "finished": ("The review ends with a full stop or an exclamation mark.", lambda c: c["no_final_punct"] == 0),
    "length": (f"The review is {reviews.MIN_LEN} to {reviews.MAX_LEN} words long.", lambda c: c["length_excess"] == 0),
    "positive": ("The review is positive overall.", lambda c: c["sentiment"] > 0),
}


def sentiment_words(tokens: list) -> tuple:
    """(positive, negative) first-occurrence sentiment words as the gold reward counts them; a negated word
    (``not`` earlier in its clause) flips sign and reads ``not <word>``; zero-weight words are left out."""
    pos, neg, negated, seen = [], [], False, set()
    for tok in tokens:
        if tok in (",", ".", "!"):
            negated = False
        elif tok == "not":
            negated = True
        elif tok in reviews.SENTIMENT and tok not in seen:
            seen.add(tok)
            weight = reviews.SENTIMENT[tok] * (reviews.NEGATION if negated else 1.0)
            word = f"not {tok}" if negated else tok
            if weight > 0:
                pos.append(word)
            elif weight < 0:
                neg.append(word)
    return pos, neg


def review_rationale(prompt: str, response: str) -> str:
    """The feature list of one review (module docstring), without its position word."""
    tokens = reviews.review_tokens(prompt, response)
    c = reviews.gold_components(prompt, response)
    pos, neg = sentiment_words(tokens)
    parts = [" ".join(pos)] if pos else []
    if neg:
        parts.append("but " + " ".join(neg))
    for key, word in PROBLEM_WORDS.items():
        if c[key] > 0:
            parts.append(" ".join([word] * min(MAX_PROBLEM_REPEAT, int(c[key]))))
    if c["length_excess"] > 0:
        parts.append("overlong" if len(tokens) > reviews.MAX_LEN else "brief")
    return " , ".join(parts) or "plain"


def judge_prompt(prompt: str, first: str, second: str) -> str:
    """The two whole reviews of (prompt, first) and (prompt, second), each after the task's ``Review :``."""
    return f"{prompt}{first} {prompt}{second}"


def rationale(prompt: str, first: str, second: str, label: str) -> str:
    """The SFT completion: both reviews' feature lists, then the verdict ``overall <label> .``."""
    return (
        f" this : {review_rationale(prompt, first)} . that : {review_rationale(prompt, second)} . "
        f"{VERDICT_WORD} {label} ."
    )


def judge_row(rng: random.Random, prompt: str, a: str, b: str) -> dict | None:
    """A judge row for responses a, b in a random order; None when their gold rewards tie."""
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    g1, g2 = reviews.gold_reward([prompt, prompt], [first, second])
    if g1 == g2:
        return None
    return {
        "prompt": judge_prompt(prompt, first, second),
        "label": POSITIONS[0] if g1 > g2 else POSITIONS[1],
        "source_prompt": prompt,
        "first": first,
        "second": second,
        "gold_first": g1,
        "gold_second": g2,
    }


def _eval_pairs(cfg: TaskConfig, n: int) -> list:
    """``n`` (prompt, a, b) triples on held-out openings (the task's eval split), drawn like the task's pairs."""
    rng, out = task_rng(reviews.NAME, cfg.seed, "judge_eval"), []
    while len(out) < n:
        opening = reviews._opening(rng, "eval", cfg.seed, full=False)[0]
        a = reviews._pair_response(rng, opening)
        b = reviews._pair_response(rng, opening)
        if a != b:
            out.append((reviews.as_prompt(opening), a, b))
    return out


def repeat_sentence(rng: random.Random, response: str) -> str | None:
    """``response`` with one of its sentences (a run of tokens ending in ``.`` / ``!``) appended 1-3 more times;
    None when it has no such sentence."""
    toks = response.split()
    ends = [i for i, t in enumerate(toks) if t in reviews.CLASSES["END"]]
    if not ends:
        return None
    k = rng.randrange(len(ends))
    sentence = toks[(ends[k - 1] + 1 if k else 0) : ends[k] + 1]
    return " " + " ".join(toks + sentence * rng.randint(1, 3))


STUTTER_TIMES = (1, 2, 3, 6, 12, 24, 40)  # extra copies of the stuttered word


def stutter_word(rng: random.Random, response: str) -> str | None:
    """``response`` with one of its words (not the final punctuation) said again ``STUTTER_TIMES`` more times in
    place (``was not not not ... masterful .``); None when it has no such word."""
    toks = response.split()
    words = [i for i, t in enumerate(toks) if t not in reviews.CLASSES["END"]]
    if not words:
        return None
    i = rng.choice(words)
    return " " + " ".join(toks[: i + 1] + [toks[i]] * rng.choice(STUTTER_TIMES) + toks[i + 1 :])


def negate_word(rng: random.Random, response: str) -> str | None:
    """``response`` with ``not`` put right after one of its verbs (``was deeply great`` -> ``was not deeply
    great``), unless a ``not`` already follows it; None when it has no such verb before its last word."""
    toks = response.split()
    verbs = [i for i, t in enumerate(toks[:-1]) if t in reviews.CLASSES["VERB"] and toks[i + 1] != "not"]
    if not verbs:
        return None
    i = rng.choice(verbs)
    return " " + " ".join(toks[: i + 1] + ["not"] + toks[i + 1 :])


def point_rows(pairs: list, seed: int = 0) -> list:
    """The pointwise judge's rows (module docstring): every distinct (prompt, response) of ``pairs``; for about
    half of them a copy repeating one of its sentences, for about a quarter a copy stuttering one of its words,
    and for another quarter a copy negating one of its verbs; ``good`` when the gold reward is above the median
    of the original responses', else ``bad``."""
    rng = random.Random(seed)
    seen = list(dict.fromkeys((p["prompt"], r) for p in pairs for r in (p["chosen"], p["rejected"])))
    golds = [reviews.gold_components(p, r)["gold"] for p, r in seen]
    median = sorted(golds)[len(golds) // 2] if golds else 0.0
    repeated = [(p, rep) for p, r in seen if rng.random() < 0.5 and (rep := repeat_sentence(rng, r))]
    stuttered = [(p, st) for p, r in seen if rng.random() < 0.25 and (st := stutter_word(rng, r))]
    negated = [(p, ng) for p, r in seen if rng.random() < 0.25 and (ng := negate_word(rng, r))]
    golds += [reviews.gold_components(p, r)["gold"] for p, r in repeated + stuttered + negated]
    return [
        {"prompt": f"{p}{r}", "completion": f" {VERDICT_WORD} {POINT_WORDS[g > median]} ."}
        for (p, r), g in zip(seen + repeated + stuttered + negated, golds, strict=True)
    ]


def principle_rows(prompt: str, responses: list) -> list:
    """One row per (response, principle), labelled ``yes`` / ``no`` from the gold features."""
    rows = []
    for response in responses:
        c = reviews.gold_components(prompt, response)
        for pid, (text, holds) in PRINCIPLES.items():
            rows.append(
                {
                    "prompt": prompt,
                    "response": response,
                    "principle_id": pid,
                    "principle": text,
                    "label": "yes" if holds(c) else "no",
                }
            )
    return rows


def make_judge_rows(cfg: TaskConfig, pairs: list) -> dict:
    """The judge files' rows, keyed like :data:`FILES`, from the task's training ``pairs`` and new held-out ones."""
    rng = task_rng(reviews.NAME, cfg.seed, "judge_order")
    train = [r for r in (judge_row(rng, p["prompt"], p["chosen"], p["rejected"]) for p in pairs) if r]
    held = [judge_row(rng, *t) for t in _eval_pairs(cfg, max(64, len(pairs) // 10))]
    sft = [
        {"prompt": r["prompt"], "completion": rationale(r["source_prompt"], r["first"], r["second"], r["label"])}
        for r in train
    ]
    verdict = [{"prompt": r["prompt"], "completion": f" {VERDICT_WORD} {r['label']} ."} for r in train]
    principles = [row for p in pairs for row in principle_rows(p["prompt"], [p["chosen"], p["rejected"]])]
    return {
        "judge_sft": sft,
        "judge_verdict_sft": verdict,
        "judge_point_sft": point_rows(pairs, cfg.seed),
        "judge_pairs": train,
        "judge_eval": [r for r in held if r],
        "principles": principles,
    }


def write_files(cfg: TaskConfig, task_dir: Path) -> None:
    """Write the judge files into ``task_dir``, which already holds the task's ``pairs.jsonl``."""
    rows = make_judge_rows(cfg, read_jsonl(Path(task_dir) / "pairs.jsonl"))
    for key, name in FILES.items():
        write_jsonl(Path(task_dir) / name, rows[key])


def paths(task_dir: str | Path) -> dict:
    """{key: path} of the judge files of a built ``reviews`` task directory."""
    return {key: Path(task_dir) / name for key, name in FILES.items()}


def rule_judges(ids: tuple = ("grammatical", "no_repeats", "finished", "length")) -> dict:
    """Rule judges over the gold features (CGPO constraints): ``id -> fn(prompts, responses) -> [satisfied]``."""

    def judge(pid: str):
        holds = PRINCIPLES[pid][1]
        return lambda prompts, responses: [
            holds(reviews.gold_components(p, r)) for p, r in zip(prompts, responses, strict=True)
        ]

    unknown = [i for i in ids if i not in PRINCIPLES]
    if unknown:
        raise ValueError(f"rule judges: {unknown} are not among {', '.join(PRINCIPLES)}")
    return {pid: judge(pid) for pid in ids}
