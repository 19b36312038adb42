"""task.max_operand: the arithmetic task's easier range, which the GRPO-family presets train on."""

from alignflow.config import TaskConfig
from alignflow.tasks import arithmetic


def test_single_digit_range_uses_every_problem_once():
    """max_operand=9: 10*10 sums + 10*11/2 non-negative differences + 10*10 products = 255 problems; prompts and
    held-out prompts partition them (no problem in both, none left out), every operand a single digit."""
    rows = arithmetic.make_rows(TaskConfig(name="arithmetic", max_operand=9, num_sft=200, num_pairs=20))
    train = [r["prompt"] for r in rows["prompts_path"]]
    held = [r["prompt"] for r in rows["eval_prompts_path"]]
    assert len(arithmetic.all_problems((9, 9))) == 255
    assert len(set(train)) == len(train) and not set(train) & set(held) and len(train) + len(held) == 255
    assert 10 <= len(held) <= 45  # split_of puts ~10% in eval
    for prompt in train + held + [r["prompt"] for r in rows["sft_path"]]:
        a, b = (int(x) for x in prompt[:-1].replace("+", " ").replace("-", " ").replace("*", " ").split())
        assert a <= 9 and b <= 9, prompt
    assert all(r["answer"] == arithmetic.solve(r["prompt"]) for r in rows["prompts_path"])


def test_default_range_is_unchanged():
    """max_operand=0 keeps 2-digit operands and the 1024 + 256 drawn prompts."""
    rows = arithmetic.make_rows(TaskConfig(name="arithmetic", num_sft=10, num_pairs=10))
    assert len(rows["prompts_path"]) == arithmetic.NUM_PROMPTS and len(rows["eval_prompts_path"]) == 256
    assert arithmetic.operand_limits(TaskConfig()) == (99, 9)
    assert arithmetic.operand_limits(TaskConfig(max_operand=5)) == (5, 5)
    assert max(int(r["prompt"].split("+")[0]) for r in rows["prompts_path"] if "+" in r["prompt"]) > 9
