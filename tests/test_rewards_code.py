"""Code rewards: the share of unit tests a program passes in the sandbox, with per-test time limits."""

import pytest
import torch

from alignflow.batch import Batch
from alignflow.rewards import CallableReward, RewardError
from alignflow.rewards.code import UnitTestReward, extract_program

TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]


def test_extract_program():
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_program("```\nx = 1\n```") == "\nx = 1\n"
    assert extract_program("a\n```py\nx=1\n```\nb\n```python\ny=2\n```") == "y=2\n"
    assert extract_program("cut off ```python\ny = 2") == "y = 2"  # the token limit closed no fence
    assert extract_program("def f(): pass") == "def f(): pass"


def test_share_of_tests_passed():
    """Hand-derived: a correct add passes 3/3; add = a - b passes only add(0, 0) == 0 (1/3); a program that
    exits before the tests, or prints fake results, passes none; a program that does not load passes none."""
    reward = UnitTestReward(per_test_s=1.0)
    fake = "import sys\nfor i in range(3):\n    print(f'x {i} pass')\nsys.exit(0)"
    responses = [
        "```python\ndef add(a, b):\n    return a + b\n```",
        "def add(a, b):\n    return a - b",
        "import os\nos._exit(0)",
        fake,
        "def add(a, b) return",
    ]
    values = reward(["p"] * 5, responses, [TESTS] * 5)
    assert values == pytest.approx([1.0, 1 / 3, 0.0, 0.0, 0.0])
    metrics = reward.metrics()
    assert metrics["sandbox/runs"] == 5 and metrics["code/tests_passed_frac"] == pytest.approx(4 / 15)
    assert reward.metrics() == {}  # reset after reading


def test_per_test_timeout_fails_only_that_test():
    """f loops forever on a negative input: that one test times out (0.5 s), the two others pass: 2/3."""
    reward = UnitTestReward(per_test_s=0.5)
    program = "def f(n):\n    while n < 0:\n        pass\n    return n"
    values = reward(["p"], [program], [["assert f(1) == 1", "assert f(-1) == -1", "assert f(2) == 2"]])
    assert values == pytest.approx([2 / 3])
    assert reward.metrics()["sandbox/failures_timeout"] == 1


def test_sandbox_failures_counted_by_cause():
    reward = UnitTestReward(per_test_s=1.0)
    """A program that exits with status 3 (run cause ``exit``) and one whose second test exhausts memory (the
    harness catches it: that test fails, the third still passes: 2/3)."""
    tests = ["assert add(1, 2) == 3", "x = bytearray(1 << 40)", "assert add(0, 0) == 0"]
    values = reward(
        ["p", "p"],
        ["def add(a, b):\n    return a + b\nimport os\nos._exit(3)", "def add(a, b):\n    return a + b"],
        [TESTS, tests],
    )
    assert values == pytest.approx([0.0, 2 / 3])
    m = reward.metrics()
    assert m["sandbox/failures_exit"] == 1 and m["sandbox/failures_memory"] == 1


def test_from_a_batch_through_callable_reward():
    """``return 0`` passes add(0, 0) == 0 and add(-1, 1) == 0 but not add(1, 2) == 3: 2/3."""
    reward = CallableReward("alignflow.rewards.code:unit_test_reward", timeout_s=60)
    batch = Batch(
        meta={
            "prompt": ["write add", "write add"],
            "response": ["def add(a, b):\n    return a + b", "def add(a, b):\n    return 0"],
            "tests": [TESTS, TESTS],
        }
    )
    assert torch.allclose(reward(batch), torch.tensor([1.0, 2 / 3]))
    bad = Batch(meta={"prompt": ["write add"], "response": ["def add(a, b): return a + b"], "tests": [[]]})
    with pytest.raises(RewardError, match="row 0.*'tests' must be a non-empty list"):
        reward(bad)
