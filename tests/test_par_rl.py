"""PAR in training: reference responses scored once per prompt, the shaped reward by hand, the config, a run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig, load_config
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rl_algos import resolve
from alignflow.trainers.rl_par import ReferenceScores, shape_with_references
from alignflow.trainers.rl_setup import needed_roles
from tests.test_online_rl import rl_cfg

ROOT = Path(__file__).resolve().parents[1]


class _RefRollout:
    """Answers each prompt with M = 2 fixed responses "<prompt>/a", "<prompt>/b"; counts the prompts asked."""

    def __init__(self):
        self.asked = []

    def generate(self, prompts: Batch, greedy: bool = False) -> Batch:
        self.asked += prompts["prompt"]
        return Batch(
            meta={
                "prompt": [p for p in prompts["prompt"] for _ in "ab"],
                "response": [f"{p}/{s}" for p in prompts["prompt"] for s in "ab"],
            }
        )


class _Reward:
    TABLE = {"x/a": 0.0, "x/b": 2.0, "y/a": 1.0, "y/b": 1.0}

    def score(self, batch: Batch) -> Batch:
        return Batch({"scores": torch.tensor([self.TABLE[r] for r in batch["response"]])})


class _Roles:
    def __init__(self):
        self.ref_rollout, self.reward = _RefRollout(), _Reward()


def _batch(prompts: list[str], scores: list[float]) -> Batch:
    n = len(prompts)
    return Batch(
        {
            "scores": torch.tensor(scores),
            "prompt_ids": torch.ones(n, 2, dtype=torch.long),
            "prompt_mask": torch.ones(n, 2, dtype=torch.long),
        },
        {"prompt": prompts},
    )


def test_par_by_hand_and_scored_once_per_prompt(reviews_task, tmp_path):
    """Prompt x has reference rewards (0, 2), prompt y (1, 1). PAR = mean_m sigmoid(R − r_ref_m):
    R = 1 on x: (σ(1) + σ(−1)) / 2 = 0.5 exactly; R = 1 on y: σ(0) = 0.5; R = 3 on y: σ(2) = 0.8808.
    A second batch with the same prompts asks the reference policy nothing new."""
    cfg = rl_cfg(reviews_task, tmp_path, reward={"task": {"gold": 1.0}, "shaping": "par"})
    roles, refs = _Roles(), ReferenceScores()
    batch = _batch(["x", "y", "y"], [1.0, 1.0, 3.0])
    m = shape_with_references(roles, batch, cfg, refs)
    assert batch["scores"].tolist() == pytest.approx([0.5, 0.5, 1 / (1 + math.exp(-2))])
    assert roles.ref_rollout.asked == ["x", "y"]
    assert m["shaping/ref_reward_mean"] == pytest.approx((1 + 1 + 1) / 3)  # rows x, y, y: (0+2)/2, 1, 1
    assert m["shaping/win_rate"] == pytest.approx(3 / 6)  # x: 1 > 0 only; y (R=1): none; y (R=3): both
    again = _batch(["y", "x"], [1.0, 2.0])
    shape_with_references(roles, again, cfg, refs)
    assert roles.ref_rollout.asked == ["x", "y"]
    assert again["scores"][1] == pytest.approx((1 / (1 + math.exp(-2)) + 0.5) / 2)  # x, R = 2: (σ(2) + σ(0)) / 2


def test_centered_shaping_by_hand(reviews_task, tmp_path):
    """centered: R − mean_m r_ref_m; x (refs 0, 2) with R = 3 gives 2."""
    cfg = rl_cfg(reviews_task, tmp_path, reward={"task": {"gold": 1.0}, "shaping": "centered"})
    batch = _batch(["x"], [3.0])
    shape_with_references(_Roles(), batch, cfg, ReferenceScores())
    assert batch["scores"].tolist() == [2.0]


def test_shaping_config(reviews_task, tmp_path):
    """shaping builds the reference even at kl.coef = 0; LoRA without ref_model and Ray workers are refused."""
    cfg = rl_cfg(reviews_task, tmp_path, kl={"coef": 0.0}, reward={"task": {"gold": 1.0}, "shaping": "par"})
    assert "ref" in needed_roles(cfg, resolve(cfg))
    with pytest.raises(ConfigError, match="ref_model"):
        resolve(
            rl_cfg(
                reviews_task,
                tmp_path,
                model={"lora": {"enabled": True}},
                reward={"task": {"gold": 1.0}, "shaping": "par"},
            )
        )
    with pytest.raises(ConfigError, match="resources.actor.workers"):
        resolve(
            rl_cfg(
                reviews_task,
                tmp_path,
                resources={"actor": {"workers": 2}},
                reward={"task": {"gold": 1.0}, "shaping": "par"},
            )
        )
    with pytest.raises(ConfigError, match="reward.shaping"):
        rl_cfg(reviews_task, tmp_path, reward={"shaping": "softmax"})


def test_par_preset_runs_with_a_bounded_reward(reviews_task, tmp_path):
    """configs/rl_par.yaml for two steps on the tiny model: the training reward is PAR, in (0, 1), and the
    reference answers are generated once per prompt text (at most 2 steps x 2 prompts x M = 2 answers)."""
    cfg = load_config(
        RLConfig,
        ROOT / "configs" / "rl_par.yaml",
        [
            f"model.name_or_path={reviews_task.model_dir}",
            f"model.tokenizer={reviews_task.tokenizer_dir}",
            f"data.path={reviews_task.prompts_path}",
            "reward.models=[]",
            "reward.task={gold: 1.0}",
            "reward.reference_samples=2",
            "rollout.prompts_per_step=2",
            "rollout.n=2",
            "rollout.max_new_tokens=6",
            "rollout.eval_prompts=0",
            f"train.output_dir={tmp_path}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.progress=false",
        ],
    )
    history = train_rl(cfg).history
    for m in history:
        assert 0.0 < m["shaping/shaped_reward_mean"] < 1.0
        assert math.isfinite(m["shaping/raw_reward_mean"]) and 0.0 <= m["shaping/win_rate"] <= 1.0
    made = history[-1]["shaping/reference_responses"]
    assert made % 2 == 0 and 4 <= made <= 8
