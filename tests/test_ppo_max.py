"""PPO-max pieces reachable from config: the entropy clip, the PTX loss, critic pre-training; and the removed
reward.lm_loss_coef."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignflow.config import ConfigError, RLConfig, RMConfig, load_config
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.trainers.ptx import PTXStream, build_ptx, ptx_examples, ptx_loss
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rl_algos import resolve
from tests.test_online_rl import rl_cfg

ROOT = Path(__file__).resolve().parents[1]


def test_ptx_loss_of_a_uniform_model_is_log_vocab(reviews_task, tmp_path):
    """Every weight 0: the hidden states and logits are 0, so p(x_t | x_<t) = 1/V for every token and the
    token-mean NLL is exactly log V, whatever the rows."""
    cfg = rl_cfg(reviews_task, tmp_path, algo={"ptx_coef": 1.0, "ptx_batch_size": 3})
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    stream = build_ptx(cfg, tok)
    model = load_causal_lm(cfg.model, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    loss, count = ptx_loss(model, stream.at(0, 3), "cpu")
    assert count > 0
    assert float(loss.detach()) == pytest.approx(math.log(model.config.vocab_size), rel=1e-5)


def test_ptx_stream_is_a_seeded_permutation_per_epoch():
    """3 examples: rows 0-2 are one permutation of them, rows 3-5 another; the first token never counts."""
    rows = [{"input_ids": [i, i + 1], "loss_mask": [1, 1]} for i in range(3)]
    examples = ptx_examples(rows)
    assert all(e["loss_mask"] == [0, 1] for e in examples)
    stream = PTXStream(examples, seed=0, pad_id=0)
    first = sorted(stream.at(0, 3)["input_ids"][:, 0].tolist())
    second = sorted(stream.at(3, 3)["input_ids"][:, 0].tolist())
    assert first == second == [0, 1, 2]
    assert stream.at(1, 2)["input_ids"].tolist() == PTXStream(examples, 0, 0).at(1, 2)["input_ids"].tolist()
    with pytest.raises(ConfigError, match="algo.ptx_path"):
        PTXStream([], 0, 0)


def test_entropy_clip_and_ptx_reach_the_actor(reviews_task, tmp_path):
    """algo.entropy_target=T turns the entropy term into token_mean |H − T|. The tiny model's vocabulary gives
    H < log V < 7, so with T = 7 the term is 7 − mean H: policy/entropy_loss + policy/entropy = 7 (one update
    pass, one micro-batch, so both are means over the same tokens). algo.ptx_coef adds policy/ptx_loss."""
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    assert math.log(len(tok)) < 7
    cfg = rl_cfg(
        reviews_task,
        tmp_path,
        algo={"name": "grpo", "entropy_coef": 0.01, "entropy_target": 7.0, "ptx_coef": 0.5, "ptx_batch_size": 4},
    )
    (m,) = train_rl(cfg).history
    assert m["policy/entropy_loss"] + m["policy/entropy"] == pytest.approx(7.0, abs=1e-4)
    assert 0 < m["policy/ptx_loss"] < math.log(len(tok)) + 1


def test_critic_pretraining_leaves_the_policy_frozen(reviews_task, tmp_path):
    """critic.pretrain_steps=2 with 2 RL steps: the actor's weights are unchanged, the critic trained."""
    cfg = rl_cfg(
        reviews_task,
        tmp_path,
        algo={"name": "ppo"},
        critic={"pretrain_steps": 2},
        rollout={"n": 1},
        train={"batch_size": 2, "max_steps": 2},
    )
    before = {k: v.clone() for k, v in load_causal_lm(cfg.model, "cpu").state_dict().items()}
    result = train_rl(cfg)
    after = result.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(h["critic/pretraining"] == 1.0 and math.isfinite(h["critic/value_loss"]) for h in result.history)
    assert "policy/policy_loss" not in result.history[-1]


def test_config_errors_name_the_keys(reviews_task, tmp_path):
    with pytest.raises(ConfigError, match="critic.pretrain_steps"):
        resolve(rl_cfg(reviews_task, tmp_path, algo={"name": "grpo"}, critic={"pretrain_steps": 1}))
    with pytest.raises(ConfigError, match="algo.entropy_coef"):
        resolve(rl_cfg(reviews_task, tmp_path, algo={"entropy_target": 3.0}))
    with pytest.raises(ConfigError, match="lm_loss_coef"):  # removed: nothing read it
        load_config(RMConfig, None, ["reward.lm_loss_coef=0.1"])


def test_ppo_max_preset_runs_one_step(reviews_task, tmp_path):
    cfg = load_config(
        RLConfig,
        ROOT / "configs" / "rl_ppo_max.yaml",
        [
            f"model.name_or_path={reviews_task.model_dir}",
            f"model.tokenizer={reviews_task.tokenizer_dir}",
            f"data.path={reviews_task.prompts_path}",
            f"algo.ptx_path={reviews_task.sft_path}",
            "rollout.prompts_per_step=4",
            "rollout.max_new_tokens=6",
            "rollout.eval_prompts=0",
            f"train.output_dir={tmp_path}",
            "train.max_steps=2",
            "critic.pretrain_steps=1",
            "train.batch_size=2",
            "train.progress=false",
        ],
    )
    first, second = train_rl(cfg).history
    assert first["critic/pretraining"] == 1.0 and "policy/ptx_loss" not in first
    assert math.isfinite(second["policy/ptx_loss"]) and math.isfinite(second["policy/entropy_loss"])
