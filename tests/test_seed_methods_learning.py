"""Evidence on the reviews task's tiny SFT model: PF-PPO raises the gold reward; the PTX loss keeps the policy's
likelihood of the SFT corpus higher than plain PPO at the same budget (InstructGPT's reason for PPO-ptx).
Longer runs of both, and PAR: bench/seed_methods.py, numbers in bench/results/seed_methods.md."""

from __future__ import annotations

import json

import torch

from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.trainers.ptx import build_ptx, ptx_loss
from alignflow.trainers.rl import train_rl
from tests.test_online_rl import rl_cfg

COMMON = dict(
    kl={"coef": 0.05},
    critic={"optim": {"lr": 3e-3, "scheduler": "constant"}},
    optim={"lr": 2e-3, "scheduler": "constant"},
)


def _gold(task, model) -> float:
    tok = load_tokenizer(str(task.tokenizer_dir))
    prompts = [json.loads(line)["prompt"] for line in open(task.eval_prompts_path)][:32]
    b = HFEngine(model, tok).generate(
        [tok(p)["input_ids"] for p in prompts], SamplingParams(n=2, max_new_tokens=24, seed=7)
    )
    texts = tok.batch_decode(
        [r[m.bool()].tolist() for r, m in zip(b["response_ids"], b["response_mask"], strict=False)],
        skip_special_tokens=True,
    )
    return sum(task.gold_reward([p for p in prompts for _ in range(2)], texts)) / len(texts)


def test_pf_ppo_raises_gold_reward(reviews_task, reviews_sft, tmp_path):
    """pf_ppo (best_random of n = 4) for 6 steps of 8 prompts (16 rows trained per step) raises the mean gold
    reward of held-out samples (the 12-step runs of bench/seed_methods.py gain about 1.3)."""
    before = _gold(reviews_task, load_causal_lm(rl_cfg(reviews_task, tmp_path, reviews_sft).model))
    cfg = rl_cfg(
        reviews_task,
        tmp_path / "pf",
        reviews_sft,
        algo={"name": "pf_ppo", "ppo_epochs": 2},
        rollout={"prompts_per_step": 8, "n": 4, "max_new_tokens": 24},
        train={"batch_size": 8, "max_steps": 6},
        **COMMON,
    )
    after = _gold(reviews_task, train_rl(cfg).model)
    assert after > before + 0.3, (before, after)


def test_ptx_keeps_the_sft_likelihood(reviews_task, reviews_sft, tmp_path):
    """PPO for 4 steps of 16 prompts with and without algo.ptx_coef=1: the token-mean NLL of 64 SFT rows ends
    lower with the PTX term (12-step runs in bench/results/seed_methods.md: 3.05 against 3.60)."""
    tok = load_tokenizer(str(reviews_task.tokenizer_dir))
    probe = build_ptx(rl_cfg(reviews_task, tmp_path, reviews_sft, algo={"ptx_coef": 1.0}), tok)

    def nll(model) -> float:
        with torch.no_grad():
            return float(ptx_loss(model.eval(), probe.at(10_000, 64), "cpu")[0])

    out = {}
    for coef in (0.0, 1.0):
        cfg = rl_cfg(
            reviews_task,
            tmp_path / f"ptx{coef}",
            reviews_sft,
            algo={"name": "ppo", "ppo_epochs": 2, "ptx_coef": coef, "ptx_batch_size": 16},
            rollout={"prompts_per_step": 16, "n": 1, "max_new_tokens": 24},
            train={"batch_size": 8, "max_steps": 4},
            **COMMON,
        )
        out[coef] = nll(train_rl(cfg).model)
    assert out[1.0] < out[0.0] - 0.05, out
