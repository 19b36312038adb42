"""The calculator (tool) and code (sandboxed unit tests) tasks."""

import json

import pytest

from alignflow.envs import ToolBox
from alignflow.rewards.code import UnitTestReward
from alignflow.tasks import calculator as calc
from alignflow.tasks import code


def test_calculator_tool_is_integer_arithmetic_only():
    assert calc.calculator("12 * (3 + 4)") == "84" and calc.calculator("-7 // 2") == "-4"
    box = ToolBox([calc.calculator])
    for expr, why in (
        ("__import__('os').system('id')", "only integers"),
        ("2 ** 10", "only integers"),
        ("1.5 * 2", "only integers"),
        ("5 // 0", "division by zero"),
        ("12 *", "not an expression"),
        ("9" * 30 + " * " + "9" * 30, "over 40 digits"),
    ):
        content, ok = box.call({"name": "calculator", "arguments": {"expression": expr}})
        assert not ok and why in content, (expr, content)


def test_calculator_env_rewards_the_tool_path():
    """Rows are reproducible; a product of two 6-digit numbers has 11-12 digits. Calling the tool and copying
    its result scores 1 on every row; answering off by one (what a near miss looks like) scores 0."""
    rows = calc.make_rows(seed=0, n=16)
    assert rows == calc.make_rows(seed=0, n=16) and rows != calc.make_rows(seed=1, n=16)
    assert all(len(r["answer"]) >= 11 for r in rows if "*" in r["expression"])
    for row in rows:
        env = calc.make_env()
        first = env.reset(row)
        assert first[0]["role"] == "system" and first[1]["content"] == row["prompt"]
        payload = json.dumps({"name": "calculator", "arguments": {"expression": row["expression"]}})
        call = f"<tool_call>{payload}</tool_call>"
        obs, reward, done, _ = env.step({"role": "assistant", "content": call})
        assert (obs[0]["content"], reward, done) == (row["answer"], 0.0, False)
        assert env.step({"role": "assistant", "content": obs[0]["content"]}).reward == 1.0
        env = calc.make_env()
        env.reset(row)
        assert env.step({"role": "assistant", "content": str(int(row["answer"]) + 1)}).reward == 0.0


def test_code_task_rows_are_solvable_and_decide():
    """Each problem's reference passes all its tests (reward 1); a function returning None passes none (every
    expected value is a number, a bool or a string, never None): half of all tests run pass."""
    rows = code.make_rows(seed=0, n=len(code.PROBLEMS))
    assert [r["function"] for r in rows] == list(code.PROBLEMS)
    reward = UnitTestReward(per_test_s=2.0)
    prompts = [r["prompt"] for r in rows]
    assert reward(prompts, [f"```python\n{r['reference']}```" for r in rows], [r["tests"] for r in rows]) == [
        1.0
    ] * len(rows)
    wrong = [f"def {r['function']}(*args):\n    return None\n" for r in rows]
    assert reward(prompts, wrong, [r["tests"] for r in rows]) == [0.0] * len(rows)
    assert reward.metrics()["code/tests_passed_frac"] == pytest.approx(0.5)
