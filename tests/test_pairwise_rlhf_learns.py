"""Pairwise RLHF learns end to end: ``alignflow rl`` with ``configs/pairwise_grpo.yaml`` (group win-rate
advantages) raises the reviews task's gold reward when the pairwise scorer prefers what the gold prefers.

The scorer here is a noise-free pairwise oracle, ``p(first beats second) = σ(g_first − g_second)`` with ``g`` the
task's gold reward, put in place of the trained preference model (``build_pairwise``), so that the test checks the
dataflow -- source, preference matrix, advantages, policy update -- without training a model first; the preset with
its real preference model runs in tests/test_presets_learn.py.
"""

import json

import torch

import alignflow.rewards.pairwise as pairwise
from alignflow.config import RLConfig, load_config
from alignflow.tasks.reviews import gold_reward
from alignflow.trainers import rl_setup
from alignflow.trainers.rl import train_rl


class GoldPairs:
    def ordered(self, prompts, firsts, seconds):
        g1, g2 = torch.tensor(gold_reward(prompts, firsts)), torch.tensor(gold_reward(prompts, seconds))
        return torch.sigmoid(g1 - g2).double(), torch.zeros(len(firsts))

    @staticmethod
    def symmetrise(p_ab, p_ba):
        return 0.5 * (p_ab + 1.0 - p_ba)


def test_pairwise_grpo_raises_the_gold_reward(tmp_path, monkeypatch):
    # the name the RL setup calls (it imports build_pairwise at module level)
    monkeypatch.setattr(rl_setup, "build_pairwise", lambda *a, **k: pairwise.PairwiseReward(GoldPairs()))
    cfg = load_config(
        RLConfig,
        "configs/pairwise_grpo.yaml",
        [
            "model.name_or_path=",  # the task's untrained tiny model: no SFT model to build first
            "data.path=",
            "data.eval_path=",
            "reward.pairwise.model=gold-oracle",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=10",
            "train.log_every=1",
            "train.progress=false",
            "rollout.prompts_per_step=8",
            "rollout.max_new_tokens=12",
            "rollout.eval_prompts=8",
            "train.batch_size=32",
            "optim.lr=3e-3",
            "train.eval_every=0",
            "task.num_sft=64",
            "task.num_pairs=64",
        ],
    )
    result = train_rl(cfg)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    gold = [r["rollout/reward_gold_mean"] for r in rows if "rollout/reward_gold_mean" in r]
    assert len(gold) == 10 and all("pairwise/best_win_rate" in r for r in rows if "rollout/reward_gold_mean" in r)
    first, last = sum(gold[:3]) / 3, sum(gold[-3:]) / 3  # measured: -1.24 -> -0.25 (raw win rates: -1.25 -> -0.32)
    assert last > first + 0.5, gold
