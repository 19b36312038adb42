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
"""

from __future__ import annotations

from alignflow.tasks.common import task_rng

NAME = "code"

# name -> (specification, reference solution, a function of the rng giving test argument tuples)
PROBLEMS = {
    "add": ("add(a, b) that returns the sum of the integers a and b",
            "def add(a, b):\n    return a + b\n",
            lambda rng: [(rng.randrange(-99, 100), rng.randrange(-99, 100)) for _ in range(3)]),
    "is_even": ("is_even(n) that returns True when the integer n is even, else False",
                "def is_even(n):\n    return n % 2 == 0\n",
                lambda rng: [(rng.randrange(-50, 51),) for _ in range(3)] + [(0,)]),
    "reverse": ("reverse(s) that returns the string s reversed",
                "def reverse(s):\n    return s[::-1]\n",
                lambda rng: [("".join(rng.choice("abcxyz") for _ in range(rng.randrange(1, 7))),) for _ in range(3)]),
    "largest": ("largest(xs) that returns the largest number of the non-empty list xs",
                "def largest(xs):\n    return max(xs)\n",
                lambda rng: [([rng.randrange(-20, 21) for _ in range(rng.randrange(1, 6))],) for _ in range(3)]),
    "count_vowels": ("count_vowels(s) that returns how many of the characters of s are one of a, e, i, o, u",
                     "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)\n",
                     lambda rng: [("".join(rng.choice("abeiouxyz") for _ in range(rng.randrange(0, 8))),)
                                  for _ in range(3)]),
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
        rows.append({"prompt": f"Write a Python function {spec}. Reply with the code in a ```python block.",
                     "tests": tests, "function": name, "reference": reference})
    return rows
