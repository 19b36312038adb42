"""The calculator and code tasks as built-in ``task.name`` choices: tokenizer, chat template, data, rewards."""

import pytest

from alignflow.config import ConfigError, RLConfig, TaskConfig, from_dict
from alignflow.data.render import encode_lm
from alignflow.rewards.code import extract_program
from alignflow.tasks import TASKS, calculator, code
from alignflow.tasks.common import read_jsonl
from tests.helpers import tiny_task


@pytest.fixture(scope="module")
def calc_task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("tasks"), "calculator", num_sft=64, num_pairs=8)


@pytest.fixture(scope="module")
def code_task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("tasks"), "code", num_sft=40, num_pairs=8)


def _tok(art):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(art.tokenizer_dir)


def test_both_tasks_are_task_name_choices():
    assert {"calculator", "code"} <= set(TASKS)
    assert from_dict(RLConfig, {"task": {"name": "calculator"}}).task.name == "calculator"
    with pytest.raises(ConfigError, match="calculator"):
        from_dict(RLConfig, {"task": {"name": "calculatr"}})


def test_calculator_sft_conversation_tokens_and_tool_round_trip(calc_task):
    """A tool conversation renders with one token per call opener/closer and per digit; the loss mask covers
    exactly the two assistant messages (call + <eos>, answer + <eos>); the call decoded from its tokens, given to
    the task's environment, returns the answer, and copying it scores 1."""
    tok = _tok(calc_task)
    rows = read_jsonl(calc_task.sft_path)
    tool = next(r["messages"] for r in rows if len(r["messages"]) == 4)
    assert any(len(r["messages"]) == 2 for r in rows)  # guesses too
    enc = encode_lm(tok, tool, max_len=128)
    trained = [i for i, m in zip(enc.input_ids, enc.loss_mask, strict=True) if m]
    call_ids = tok(tool[1]["content"], add_special_tokens=False)["input_ids"]
    answer_ids = tok(tool[3]["content"], add_special_tokens=False)["input_ids"]
    assert trained == call_ids + [tok.eos_token_id] + answer_ids + [tok.eos_token_id]
    expression = tool[0]["content"].removeprefix("What is ").removesuffix("?")
    assert len(call_ids) == len(expression.replace(" ", "")) + 2 and "*" in expression
    env = calculator.task_env()
    first = env.reset({"prompt": tool[0]["content"], "answer": tool[3]["content"]})
    assert first == [tool[0]]  # no system message in the built-in task
    obs, reward, done, _ = env.step({"role": "assistant", "content": tok.decode(call_ids, skip_special_tokens=True)})
    assert (obs[0]["content"], reward, done) == (tool[3]["content"], 0.0, False)
    assert env.step({"role": "assistant", "content": tok.decode(answer_ids)}).reward == 1.0


def test_calculator_prompts_split_and_gold(calc_task):
    train, held = read_jsonl(calc_task.prompts_path), read_jsonl(calc_task.eval_prompts_path)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert all(len(r["answer"]) >= 11 for r in train[:50])
    assert calculator.gold_reward([train[0]["prompt"]] * 2, [train[0]["answer"], "12"]) == [1.0, 0.0]


def test_code_task_references_round_trip_and_bugs_lose(code_task):
    """Every reference and bug decodes from its tokens to the same text (whitespace included), so the bare
    program the model writes runs as written; the reference scores 1 on the row's and the held-out tests, its
    bug less."""
    tok = _tok(code_task)
    for name, (_, reference, _) in code.PROBLEMS.items():
        for program in (reference, code.BUGS[name]):
            ids = tok(program, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == program
            assert extract_program(program) == program
    rows = read_jsonl(code_task.prompts_path)[:2]
    sft = read_jsonl(code_task.sft_path)
    assert {r["completion"] for r in sft} <= {p[1] for p in code.PROBLEMS.values()} | set(code.BUGS.values())
    prompts = [r["prompt"] for r in rows]
    refs = [code.PROBLEMS[r["function"]][1] for r in rows]
    bugs = [code.BUGS[r["function"]] for r in rows]
    assert code.tests_reward(prompts, refs, [r["tests"] for r in rows]) == [1.0, 1.0]
    assert code.gold_reward(prompts, refs) == [1.0, 1.0]
    assert all(g < 1.0 for g in code.gold_reward(prompts, bugs))


def test_tasks_without_environment_are_refused_for_env_task():
    from alignflow.trainers.multiturn_rl import check

    with pytest.raises(ConfigError, match="task 'reviews' has no environment.*calculator"):
        check(from_dict(RLConfig, {"env": {"task": True}, "task": {"name": "reviews"}}))
    with pytest.raises(ConfigError, match="algo.name"):
        check(from_dict(RLConfig, {"env": {"task": True}, "task": {"name": "calculator"}, "algo": {"name": "remax"}}))
    check(from_dict(RLConfig, {"env": {"task": True}, "task": {"name": "calculator"}, "rollout": {"backend": "vllm"}}))
    check(from_dict(RLConfig, {"env": {"task": True}, "task": TaskConfig(name="calculator").__dict__}))
