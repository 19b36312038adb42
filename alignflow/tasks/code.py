"""The ``code`` task: write a small Python function; unit tests run in the sandbox decide.

    from alignflow.tasks.code import make_rows
    rows = make_rows(seed=0, n=32)   # {"prompt": "Write a Python function add(a, b) ...", "tests": [...], ...}

Each row names one function from :data:`PROBLEMS` (a short specification, with its arguments drawn from the
seed so that the tests differ between rows) and carries ``tests``: ``assert`` statements checked by
``alignflow.rewards.code:unit_test_reward`` (reward = share passed). ``reference`` holds a correct solution,
used by the tests of this module to check that every row is solvable and that wrong programs lose reward.

As an RL config::

    reward:
      functions: {"alignflow.rewards.code:unit_test_reward": 1.0}
      timeout_s: 120

As a built-in task (``task.name: code``, :data:`TASK`): short prompts (``"Write add(a, b): the sum of a and b"``)
and completions that are the bare program (no fence: the code reward then runs the whole response). The
tokenizer joins tokens with no separator and keeps every piece of whitespace a program needs inside added
tokens (``"def "``, ``":\n    return "``, ``" + "``, ...), so the references round-trip exactly (tested). The SFT
corpus answers with the reference, or, in ``BUG_FRACTION`` of the rows, with a plausible bug (:data:`BUGS`), so
RL has headroom. Rewards: ``tests`` (the row's seeded tests, in the sandbox) and ``gold`` (fixed held-out
tests of the function, drawn from its name).
"""

from __future__ import annotations

import re

from alignflow.config import TaskConfig
from alignflow.rewards.code import unit_test_reward
from alignflow.tasks.common import TaskSpec, make_pair, task_rng

NAME = "code"

# name -> (specification, reference solution, a function of the rng giving test argument tuples)
PROBLEMS = {
    "add": (
        "add(a, b) that returns the sum of the integers a and b",
        "def add(a, b):\n    return a + b\n",
        lambda rng: [(rng.randrange(-99, 100), rng.randrange(-99, 100)) for _ in range(3)],
    ),
    "is_even": (
        "is_even(n) that returns True when the integer n is even, else False",
        "def is_even(n):\n    return n % 2 == 0\n",
        lambda rng: [(rng.randrange(-50, 51),) for _ in range(3)] + [(0,)],
    ),
    "reverse": (
        "reverse(s) that returns the string s reversed",
        "def reverse(s):\n    return s[::-1]\n",
        lambda rng: [("".join(rng.choice("abcxyz") for _ in range(rng.randrange(1, 7))),) for _ in range(3)],
    ),
    "largest": (
        "largest(xs) that returns the largest number of the non-empty list xs",
        "def largest(xs):\n    return max(xs)\n",
        lambda rng: [([rng.randrange(-20, 21) for _ in range(rng.randrange(1, 6))],) for _ in range(3)],
    ),
    "count_vowels": (
        "count_vowels(s) that returns how many of the characters of s are one of a, e, i, o, u",
        "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)\n",
        lambda rng: [("".join(rng.choice("abeiouxyz") for _ in range(rng.randrange(0, 8))),) for _ in range(3)],
    ),
}


def _expected(reference: str, name: str, args: tuple):
    namespace: dict = {}
    exec(reference, namespace)  # our own reference solutions, never model output
    return namespace[name](*args)


def make_rows(seed: int = 0, n: int = 64) -> list[dict]:
    """``n`` rows ``{"prompt", "tests", "function", "reference"}``, cycling through :data:`PROBLEMS`."""
    rng = task_rng(NAME, seed, "problems")
    names = list(PROBLEMS)
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        spec, reference, draw = PROBLEMS[name]
        tests = [f"assert {name}{args!r} == {_expected(reference, name, args)!r}" for args in draw(rng)]
        rows.append(
            {
                "prompt": f"Write a Python function {spec}. Reply with the code in a ```python block.",
                "tests": tests,
                "function": name,
                "reference": reference,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ built-in task
BUGS = {
    "add": "def add(a, b):\n    return a - b\n",
    "is_even": "def is_even(n):\n    return n % 2 == 1\n",
    "reverse": "def reverse(s):\n    return s\n",
    "largest": "def largest(xs):\n    return min(xs)\n",
    "count_vowels": "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s) + 1\n",
}
SHORT = {
    "add": "add(a, b): the sum of a and b",
    "is_even": "is_even(n): True when n is even",
    "reverse": "reverse(s): the string s reversed",
    "largest": "largest(xs): the largest number in xs",
    "count_vowels": "count_vowels(s): how many of the characters of s are vowels",
}
BUG_FRACTION = 0.3
# every whitespace a program needs is inside one of these (matched whole, before the split)
ADDED = ("def ", ":\n    return ", " + ", " - ", " % ", " == ", ", ", " in ", " for ", "\n", "'aeiou'")
_WORD = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")


def short_prompt(name: str) -> str:
    return f"Write {SHORT[name]}"


def _vocab() -> tuple:
    texts = [short_prompt(n) for n in PROBLEMS] + [PROBLEMS[n][1] for n in PROBLEMS] + list(BUGS.values())
    words: dict = {}
    for text in texts:
        for piece in ADDED:
            text = text.replace(piece, " ")
        words.update(dict.fromkeys(_WORD.findall(text)))
    return tuple(words)


def held_out_tests(name: str) -> list:
    """Fixed tests of problem ``name`` (drawn from its name, not the task seed): the gold reward's."""
    spec, reference, draw = PROBLEMS[name]
    rng = task_rng(NAME, 0, f"gold/{name}")
    return [f"assert {name}{args!r} == {_expected(reference, name, args)!r}" for args in draw(rng)]


def _name_of(prompt: str) -> str:
    for name in PROBLEMS:
        if prompt.startswith(f"Write {name}("):
            return name
    raise ValueError(f"code task: prompt {prompt[:60]!r} names none of {', '.join(PROBLEMS)}")


def gold_reward(prompts: list, responses: list) -> list:
    """Share of the function's held-out tests that the response passes (run in the sandbox)."""
    return unit_test_reward(prompts, responses, [held_out_tests(_name_of(p)) for p in prompts])


def tests_reward(prompts: list, responses: list, tests: list, **_) -> list:
    """Share of the row's own ``tests`` that the response passes (run in the sandbox)."""
    return unit_test_reward(prompts, responses, tests)


def _task_rows(cfg: TaskConfig) -> dict:
    """SFT rows (reference or bug), train / eval prompts with their seeded tests, reference-vs-bug pairs."""
    rows = make_rows(cfg.seed, max(cfg.num_sft, 256))
    for row in rows:
        row["prompt"] = short_prompt(row["function"])
    rng = task_rng(NAME, cfg.seed, "sft")
    sft = [
        {"prompt": r["prompt"], "completion": BUGS[r["function"]] if rng.random() < BUG_FRACTION else r["reference"]}
        for r in rows[: cfg.num_sft]
    ]
    keep = ("prompt", "tests", "function")
    prompts = [{k: r[k] for k in keep} for r in rows[:128]]
    rng = task_rng(NAME, cfg.seed, "pairs")
    pairs = [
        make_pair(rng, r["prompt"], r["reference"], BUGS[r["function"]], 1.0, 0.0, cfg.label_noise)
        for r in (rows[i % len(rows)] for i in range(cfg.num_pairs))
    ]
    rated = []
    for i, p in enumerate(pairs[: max(1, len(pairs) // 2)]):
        ref = rows[i % len(rows)]["reference"]
        rated.append(
            {
                "prompt": p["prompt"],
                "completions": [p["chosen"], p["rejected"]],
                "ratings": [{"correct": float(p["chosen"] == ref)}, {"correct": float(p["rejected"] == ref)}],
            }
        )
    return {
        "sft_path": sft,
        "prompts_path": prompts[:96],
        "eval_prompts_path": prompts[96:],
        "pairs_path": pairs,
        "rated_path": rated,
    }


TASK = TaskSpec(
    name=NAME,
    vocab=_vocab(),
    join="",
    make_rows=_task_rows,
    gold_reward=gold_reward,
    rewards={"gold": gold_reward, "tests": tests_reward},
    added=ADDED,
)
