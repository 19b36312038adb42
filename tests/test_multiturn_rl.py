"""Multi-turn episodes in ``alignflow rl`` (env.task / env.path): the plumbing, then a learning test on the
calculator task."""

from __future__ import annotations

import json

import pytest
import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig, from_dict
from alignflow.trainers.rl import train_rl
from alignflow.trainers.roles import micro_batches
from tests.helpers import tiny_task


@pytest.fixture(scope="module")
def calc_task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("tasks"), "calculator", num_sft=16, num_pairs=8)


def env_cfg(task, out, model_dir=None, **sections) -> RLConfig:
    base = {
        "model": {"name_or_path": str(model_dir or task.model_dir), "tokenizer": str(task.tokenizer_dir)},
        "data": {"path": str(task.prompts_path), "eval_path": str(task.eval_prompts_path)},
        "task": {"name": "calculator"},
        "env": {"task": True, "max_turns": 2, "max_tokens": 64},
        "algo": {"name": "grpo"},
        "kl": {"coef": 0.0},
        "rollout": {"prompts_per_step": 2, "n": 2, "max_new_tokens": 8, "eval_prompts": 2},
        "optim": {"lr": 1e-3},
        "train": {"output_dir": str(out), "batch_size": 4, "max_steps": 2, "progress": False, "eval_every": 1},
    }
    for k, v in sections.items():
        base[k] = base.get(k, {}) | v
    return from_dict(RLConfig, base)


def test_micro_batches_keep_the_observation_tokens():
    """A row whose loss mask is [1, 0, 0, 1] (a model token, two observation tokens, a model token) keeps all four
    response columns and its real length is prompt 2 + 4, not 2 + 2 (the loss mask's count)."""
    b = Batch(
        {
            "prompt_mask": torch.tensor([[1, 1]]),
            "response_mask": torch.tensor([[1, 0, 0, 1, 0]]),
            "response_attention": torch.tensor([[1, 1, 1, 1, 0]]),
            "input_ids": torch.arange(7)[None],
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0]]),
            "position_ids": torch.arange(7)[None],
            "response_ids": torch.arange(2, 7)[None],
        }
    )
    [(idx, mb, pw)] = micro_batches(b, 1000)
    assert pw == 2 and mb["response_mask"].tolist() == [[1, 0, 0, 1]] and mb.meta["seq_lens"] == [6]


def test_rl_runs_episodes_and_stores_trajectories(calc_task, tmp_path):
    """Two GRPO steps of episodes against the calculator environment (untrained model): per-step episode and
    tool metrics, greedy episode evaluation, trajectories.jsonl with messages and per-turn rewards, and no
    reward source needed (the environment rewards)."""
    result = train_rl(env_cfg(calc_task, tmp_path))
    assert len(result.history) == 2
    lines = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0] * 4 + [1] * 4
    for step, m in enumerate(result.history):  # the step's metrics are the means over its stored episodes
        episodes = [x for x in lines if x["step"] == step]
        assert m["episode/turns_mean"] == pytest.approx(sum(x["turns"] for x in episodes) / 4)
        assert m["tools/calls_per_episode"] == pytest.approx(sum(x["tool_calls"] for x in episodes) / 4)
        assert all(1 <= x["turns"] <= 2 for x in episodes)  # env.max_turns = 2
        assert m["rollout/reward_mean"] == m["episode/return_mean"] and "episode/final_reward_mean" in m
    assert "eval/episode/turns_mean" in result.evals[0][1] and "eval/reward_mean" in result.evals[-1][1]
    first = lines[0]
    assert first["messages"][0]["role"] == "user" and first["messages"][1]["role"] == "assistant"
    assert len(first["turn_rewards"]) == first["turns"] and first["return"] == sum(first["turn_rewards"])


def test_env_path_and_refusals(calc_task, tmp_path):
    """env.path loads an environment factory by dotted path (with env.kwargs); one line names what is wrong."""
    cfg = env_cfg(
        calc_task,
        tmp_path / "a",
        env={"task": False, "path": "alignflow.tasks.calculator:make_env", "kwargs": {"system": ""}},
        train={"max_steps": 1, "eval_every": 0},
    )
    assert len(train_rl(cfg).history) == 1
    with pytest.raises(ConfigError, match="env.task and env.path"):
        train_rl(env_cfg(calc_task, tmp_path / "b", env={"path": "alignflow.tasks.calculator:make_env"}))
    with pytest.raises(ConfigError, match="dapo.dynamic_sampling"):
        train_rl(env_cfg(calc_task, tmp_path / "c", dapo={"dynamic_sampling": True}))
