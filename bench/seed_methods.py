"""PF-PPO, PAR and PTX against plain PPO on the reviews task's tiny model (CPU, a few minutes per run).

Workload: the reviews task's 1-layer, 32-wide model after 60 SFT steps (lr 3e-3, 32 rows), the task's hidden gold
reward as the training reward, 12 RL steps, β = 0.05, 2 PPO epochs, mini-batches of 16, actor lr 1e-3, critic
lr 3e-3. PPO, PAR and PTX sample 32 prompts x 1 per step; PF-PPO samples 16 prompts x 4 and trains on 2 of each
prompt's samples (best + random): the same 32 rows trained per step. Measured after training: the mean gold reward
of 4 samples on each of 48 held-out prompts, and the token-mean NLL of 64 rows of the task's SFT corpus.

    python bench/seed_methods.py pf,par,noptx,ptx [seed]       # prints one line per run
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from alignflow.config import RLConfig, SFTConfig, TaskConfig, from_dict
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.tasks import build_task
from alignflow.trainers.ptx import build_ptx, ptx_loss
from alignflow.trainers.rl import train_rl
from alignflow.trainers.sft import train_sft

ROOT = Path("runs/bench_seed_methods")


def rl_config(task, out: Path, model: Path, **sections) -> RLConfig:
    base = {
        "model": {"name_or_path": str(model), "tokenizer": str(task.tokenizer_dir)},
        "data": {"path": str(task.prompts_path)},
        "task": {"name": task.name},
        "reward": {"task": {"gold": 1.0}},
        "kl": {"coef": 0.05},
        "critic": {"optim": {"lr": 3e-3, "scheduler": "constant"}},
        "optim": {"lr": 1e-3, "scheduler": "constant"},
        "rollout": {"prompts_per_step": 32, "n": 1, "max_new_tokens": 24, "eval_prompts": 0},
        "train": {"output_dir": str(out), "batch_size": 16, "max_steps": 12, "progress": False, "overwrite": True},
    }
    for k, v in sections.items():
        base[k] = base.get(k, {}) | v
    return from_dict(RLConfig, base)


RUNS = {
    "pf": dict(algo={"name": "pf_ppo", "ppo_epochs": 2}, rollout={"prompts_per_step": 16, "n": 4}),
    "par": dict(algo={"name": "ppo", "ppo_epochs": 2}, reward={"task": {"gold": 1.0}, "shaping": "par"}),
    "noptx": dict(algo={"name": "ppo", "ppo_epochs": 2}),
    "ptx": dict(algo={"name": "ppo", "ppo_epochs": 2, "ptx_coef": 1.0, "ptx_batch_size": 16}),
}


def main(which: str, seed: int) -> None:
    task = build_task(
        "reviews",
        TaskConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, num_sft=400, num_pairs=300),
        ROOT / "task",
    )
    sft = ROOT / "sft" / "model"
    if not sft.exists():
        train_sft(
            from_dict(
                SFTConfig,
                {
                    "model": {"name_or_path": str(task.model_dir), "tokenizer": str(task.tokenizer_dir)},
                    "data": {"path": str(task.sft_path), "max_len": 64, "eval_fraction": 0.0},
                    "optim": {"lr": 3e-3, "scheduler": "constant"},
                    "train": {
                        "output_dir": str(ROOT / "sft"),
                        "batch_size": 32,
                        "max_steps": 60,
                        "progress": False,
                        "overwrite": True,
                    },
                },
            )
        )
    tok = load_tokenizer(str(task.tokenizer_dir))
    prompts = [json.loads(line)["prompt"] for line in open(task.eval_prompts_path)][:48]
    ptx = build_ptx(rl_config(task, ROOT / "ptx_probe", sft, algo={"ptx_coef": 1.0}), tok)

    def gold(model) -> float:
        b = HFEngine(model, tok).generate(
            [tok(p)["input_ids"] for p in prompts], SamplingParams(n=4, max_new_tokens=24, seed=7)
        )
        texts = tok.batch_decode(
            [r[m.bool()].tolist() for r, m in zip(b["response_ids"], b["response_mask"], strict=False)],
            skip_special_tokens=True,
        )
        return sum(task.gold_reward([p for p in prompts for _ in range(4)], texts)) / len(texts)

    @torch.no_grad()
    def nll(model) -> float:
        model.eval()
        return float(ptx_loss(model, ptx.at(10_000, 64), "cpu")[0])

    start = load_causal_lm(rl_config(task, ROOT / "x", sft).model)
    print(f"sft  gold {gold(start):.3f}  sft_nll {nll(start):.3f}")
    for name in which.split(","):
        t0 = time.time()
        kw = dict(RUNS[name])
        cfg = rl_config(task, ROOT / name, sft, **kw)
        cfg.train.seed = seed
        result = train_rl(cfg)
        print(
            f"{name}  gold {gold(result.model):.3f}  sft_nll {nll(result.model):.3f}  "
            f"kl {result.history[-1].get('policy/kl', float('nan')):.2f}  secs {time.time() - t0:.0f}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pf,par,noptx,ptx", int(sys.argv[2]) if len(sys.argv) > 2 else 0)
