"""The ``arithmetic`` task: verifiable-reward RL on small sums, differences and products.

Prompts are ``"37+58="``; the completion is the answer's digits, ``"95"`` (the trainer appends EOS), so
``prompt + completion`` is ``"37+58=95"``. Operands have up to ``DIGITS`` digits (``*`` multiplies a
``DIGITS``-digit number by a ``MUL_DIGITS``-digit one); a difference is never negative (the larger operand
comes first). The tokenizer splits digits, so every digit and operator is one token.

Rewards (all ``f(prompts, responses, ...) -> list[float]``, deterministic)::

    format_reward    1 if the response is only an integer ("95", optionally surrounded by whitespace and
                     followed by "<eos>"), else 0
    accuracy_reward  1 if format_reward is 1 and the integer equals the answer (``answers`` given, or computed
                     from the prompt), else 0
    gold_reward      = accuracy_reward with the answer computed from the prompt

The SFT corpus has ``WRONG_FRACTION`` of rows with a wrong (near-miss) answer, so RL has headroom above
imitation. Preference pairs compare two responses from a mix of correct, near-miss and malformed answers,
labelled by a Bradley-Terry draw on the gold reward. Rated rows (``rated.jsonl``) give ``RATED_COMPLETIONS`` such
responses per prompt with K = 2 attribute ratings: ``correct`` (accuracy_reward) and ``well_formed``
(format_reward).
"""

from __future__ import annotations

import random
import re

from alignflow.config import TaskConfig
from alignflow.tasks.common import EOS, TaskSpec, make_pair, sample_unique, split_of, task_rng

NAME = "arithmetic"
DIGITS = 2  # operands of + and - are 0 .. 10**DIGITS - 1
MUL_DIGITS = 1  # the second factor of * has this many digits
OPERATORS = ("+", "-", "*")
OPERATOR_WEIGHTS = (0.4, 0.4, 0.2)
WRONG_FRACTION = 0.3  # SFT rows whose completion is a wrong answer
PAIR_CORRECT = 0.8  # pairs with one correct response (the rest compare two wrong ones)
NUM_PROMPTS = 1024
NUM_EVAL_PROMPTS = 256
VOCAB = tuple("0123456789") + OPERATORS + ("=",)

_PROMPT = re.compile(r"^\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*$")
_INTEGER = re.compile(r"^-?\d+$")


def solve(prompt: str) -> str:
    """The answer to ``"a<op>b="`` as a string; ValueError for anything else."""
    m = _PROMPT.match(prompt)
    if not m:
        raise ValueError(f"arithmetic prompt must look like '37+58=', got {prompt!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def _clean(response: str) -> str:
    text = response.strip()
    if text.endswith(EOS):
        text = text[: -len(EOS)].strip()
    return text


def format_reward(prompts: list, responses: list, **_) -> list:
    """1.0 where the response is only an integer (then optionally ``<eos>``), else 0.0."""
    return [float(bool(_INTEGER.match(_clean(r)))) for r in responses]


def accuracy_reward(prompts: list, responses: list, answers: list | None = None, **_) -> list:
    """1.0 where the response is exactly the answer (well-formed integer, string match), else 0.0.

    ``answers`` defaults to the answers computed from the prompts (the ``answer`` field of prompts.jsonl).
    """
    if answers is None:
        answers = [solve(p) for p in prompts]
    if not (len(prompts) == len(responses) == len(answers)):
        raise ValueError(f"accuracy_reward: {len(prompts)} prompts, {len(responses)} responses, {len(answers)} answers")
    return [float(_clean(r) == str(a).strip()) for r, a in zip(responses, answers, strict=False)]


def gold_reward(prompts: list, responses: list) -> list:
    """The hidden gold reward: exact-match accuracy against the answer computed from the prompt."""
    return accuracy_reward(prompts, responses)


# ------------------------------------------------------------------------------------------------ generator
def operand_limits(cfg: TaskConfig | None = None) -> tuple[int, int]:
    """(largest operand of + and -, largest second factor of *): ``task.max_operand`` (0: ``10**DIGITS - 1``) and
    the smaller of it and ``10**MUL_DIGITS - 1``."""
    top = (cfg.max_operand if cfg is not None else 0) or 10**DIGITS - 1
    return top, min(top, 10**MUL_DIGITS - 1)


def sample_problem(rng: random.Random, limits: tuple[int, int] = (10**DIGITS - 1, 10**MUL_DIGITS - 1)) -> dict:
    """``{"prompt": "37+58=", "answer": "95"}`` with operands up to ``limits`` (:func:`operand_limits`)."""
    op = rng.choices(OPERATORS, weights=OPERATOR_WEIGHTS)[0]
    a = rng.randrange(limits[0] + 1)
    b = rng.randrange((limits[1] if op == "*" else limits[0]) + 1)
    if op == "-" and b > a:
        a, b = b, a
    prompt = f"{a}{op}{b}="
    return {"prompt": prompt, "answer": solve(prompt)}


def all_problems(limits: tuple[int, int]) -> list:
    """Every distinct problem within ``limits``: (top+1)^2 sums, (top+1)(top+2)/2 differences (a >= b) and
    (top+1)(mul+1) products."""
    top, mul = limits
    pairs = {
        "+": [(a, b) for a in range(top + 1) for b in range(top + 1)],
        "-": [(a, b) for a in range(top + 1) for b in range(a + 1)],
        "*": [(a, b) for a in range(top + 1) for b in range(mul + 1)],
    }
    return [{"prompt": f"{a}{op}{b}=", "answer": solve(f"{a}{op}{b}=")} for op in OPERATORS for a, b in pairs[op]]


def _prompt_rows(cfg: TaskConfig, split: str, n: int) -> list:
    """``n`` distinct prompts of ``split``; when the problem space is small (``task.max_operand``), all of the
    split's problems in a seeded order, at most ``n``."""
    limits = operand_limits(cfg)
    rng = task_rng(NAME, cfg.seed, split + "_prompts")
    problems = all_problems(limits) if limits[0] < 50 else None
    if problems is None or len(problems) >= 4 * (NUM_PROMPTS + NUM_EVAL_PROMPTS):
        return sample_unique(lambda: _sample_split(rng, split, cfg.seed, limits), n, f"{split} prompts")
    rows = [p for p in problems if split_of(p["prompt"], cfg.seed) == split]
    rng.shuffle(rows)
    return rows[:n]


def near_miss(rng: random.Random, answer: str) -> str:
    """A plausible wrong answer: off by a little, by ten, or with one digit changed; never the answer."""
    value = int(answer)
    while True:
        kind = rng.randrange(3)
        if kind == 0:
            wrong = value + rng.choice((-2, -1, 1, 2))
        elif kind == 1:
            wrong = value + rng.choice((-10, 10))
        else:
            digits = list(answer)
            i = rng.randrange(len(digits))
            digits[i] = rng.choice("0123456789".replace(digits[i], ""))
            wrong = int("".join(digits))
        if wrong >= 0 and wrong != value:
            return str(wrong)


def _malformed(rng: random.Random, answer: str) -> str:
    """A response that fails the format check: operator debris or a repeated equation."""
    return rng.choice((answer + "+", "=" + answer, answer + "=" + answer, answer + "*1", "+"))


def _wrong(rng: random.Random, answer: str) -> str:
    return near_miss(rng, answer) if rng.random() < 0.75 else _malformed(rng, answer)


def _pair_responses(rng: random.Random, answer: str) -> tuple:
    """Two different responses: the first is correct with probability PAIR_CORRECT, the second never is."""
    a = answer if rng.random() < PAIR_CORRECT else _wrong(rng, answer)
    b = a
    while b == a:
        b = _wrong(rng, answer)
    return a, b


def _sample_split(rng: random.Random, split: str, seed: int, limits: tuple[int, int]) -> dict:
    while True:
        row = sample_problem(rng, limits)
        if split_of(row["prompt"], seed) == split:
            return row


RATED_COMPLETIONS = 4


def _rated_rows(cfg: TaskConfig) -> list:
    """``num_pairs // 2`` rated rows: the answer (probability 1/2) among distinct wrong or malformed responses."""
    rng, rows = task_rng(NAME, cfg.seed, "rated"), []
    for _ in range(max(1, cfg.num_pairs // 2)):
        row = _sample_split(rng, "train", cfg.seed, operand_limits(cfg))
        completions = [row["answer"]] if rng.random() < 0.5 else []
        while len(completions) < RATED_COMPLETIONS:
            c = _wrong(rng, row["answer"])
            if c not in completions:
                completions.append(c)
        rng.shuffle(completions)
        prompts = [row["prompt"]] * len(completions)
        ratings = [
            {"correct": a, "well_formed": f}
            for a, f in zip(accuracy_reward(prompts, completions), format_reward(prompts, completions), strict=False)
        ]
        rows.append({"prompt": row["prompt"], "completions": completions, "ratings": ratings})
    return rows


def make_rows(cfg: TaskConfig) -> dict:
    """The task's data: {"sft_path": rows, "prompts_path": rows, "eval_prompts_path": rows, "pairs_path": rows}."""
    rng = task_rng(NAME, cfg.seed, "sft")
    sft = []
    for _ in range(cfg.num_sft):
        row = _sample_split(rng, "train", cfg.seed, operand_limits(cfg))
        wrong = rng.random() < WRONG_FRACTION
        sft.append({"prompt": row["prompt"], "completion": near_miss(rng, row["answer"]) if wrong else row["answer"]})
    prompts = {
        key: _prompt_rows(cfg, split, n)
        for key, split, n in (("prompts_path", "train", NUM_PROMPTS), ("eval_prompts_path", "eval", NUM_EVAL_PROMPTS))
    }
    rng = task_rng(NAME, cfg.seed, "pairs")
    pairs = []
    for _ in range(cfg.num_pairs):
        row = _sample_split(rng, "train", cfg.seed, operand_limits(cfg))
        a, b = _pair_responses(rng, row["answer"])
        ga, gb = gold_reward([row["prompt"]] * 2, [a, b])
        pairs.append(make_pair(rng, row["prompt"], a, b, ga, gb, cfg.label_noise))
    return {"sft_path": sft, **prompts, "pairs_path": pairs, "rated_path": _rated_rows(cfg)}


TASK = TaskSpec(
    name=NAME,
    vocab=VOCAB,
    join="",
    make_rows=make_rows,
    gold_reward=gold_reward,
    rewards={"gold": gold_reward, "format": format_reward, "accuracy": accuracy_reward},
)
