"""Online iterative DPO vs offline DPO on the built-in ``reviews`` task, after the same number of updates.

Both runs are ``alignflow online_po`` with ``method=iterative_dpo`` (reference = the SFT model, best-vs-worst pairs of
``n`` samples labelled by the task's gold reward, DPO with beta 0.1) and differ only in where the pairs come from:

* online:  R rounds; round r answers P fresh prompts with the CURRENT policy and takes S steps;
* offline: 1 round; the same R*P prompts answered once by the SFT model, R*S steps (pairs sampled once).

Same prompts, same number of pairs per prompt, same batch size, same number of optimiser updates (R*S), same
learning rate. The gold reward is measured on held-out prompts by sampling (temperature 1; the same seed for every
policy), never greedily. The RLHF Workflow paper (Dong et al. 2024) reports online > offline; we report what we get.

    python bench/compare_online_offline.py                       # 3 seeds, ~2 min per seed on 1 CPU thread
    python bench/compare_online_offline.py --seeds 0 --rounds 2

Writes ``bench/results/online_vs_offline.json`` (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignflow.config import OnlinePOConfig, SFTConfig, TaskConfig, from_dict  # noqa: E402
from alignflow.tasks import build_task  # noqa: E402
from alignflow.trainers.online_po import train_online_po  # noqa: E402
from alignflow.trainers.sft import train_sft  # noqa: E402


def sft_model(task, root: Path, steps: int, seed: int) -> Path:
    out = root / f"sft-{steps}-seed{seed}"
    if not (out / "model").exists():
        train_sft(
            from_dict(
                SFTConfig,
                {
                    "model": {"name_or_path": str(task.model_dir), "tokenizer": str(task.tokenizer_dir)},
                    "data": {"path": str(task.sft_path), "max_len": 64, "eval_fraction": 0.0},
                    "optim": {"lr": 3e-3, "scheduler": "constant"},
                    "train": {
                        "overwrite": True,
                        "output_dir": str(out),
                        "batch_size": 32,
                        "max_steps": steps,
                        "seed": seed,
                        "progress": False,
                    },
                },
            )
        )
    return out / "model"


def run(task, sft: Path, out: Path, args, rounds: int, prompts: int, steps: int, seed: int) -> dict:
    cfg = from_dict(
        OnlinePOConfig,
        {
            "model": {"name_or_path": str(sft), "tokenizer": str(task.tokenizer_dir)},
            "data": {"path": str(task.prompts_path), "eval_path": str(task.eval_prompts_path)},
            "task": {"name": "reviews"},
            "reward": {"task": {"gold": 1.0}},
            "loss": {"name": "dpo", "beta": args.beta},
            "online": {
                "method": "iterative_dpo",
                "rounds": rounds,
                "prompts_per_round": prompts,
                "steps_per_round": steps,
                "eval_samples": args.eval_samples,
            },
            "rollout": {
                "n": args.n,
                "max_new_tokens": args.max_new_tokens,
                "eval_prompts": args.eval_prompts,
                "prompts_per_step": 64,
            },
            "optim": {"lr": args.lr, "scheduler": "constant"},
            "train": {
                "overwrite": True,
                "output_dir": str(out),
                "batch_size": args.batch_size,
                "seed": seed,
                "progress": False,
            },
        },
    )
    t0 = time.perf_counter()
    res = train_online_po(cfg)
    return {
        "gold_init": res.evals[0][1]["eval/gold_reward"],
        "gold": res.eval["eval/gold_reward"],
        "gold_per_round": [ev["eval/gold_reward"] for _, ev in res.evals],
        "response_len": res.eval["eval/response_len"],
        "updates": len(res.history),
        "pairs": sum(r.get("online/pairs", 0) for r in res.rounds),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts-per-round", type=int, default=128)
    ap.add_argument("--steps-per-round", type=int, default=12)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--root", default="runs/bench_online_offline")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "online_vs_offline.json"))
    args = ap.parse_args()
    root = Path(args.root)
    task = build_task(
        "reviews",
        TaskConfig(
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=2,
            intermediate_size=2 * args.hidden,
            num_sft=2000,
        ),
        root / "task",
    )
    R, P, S = args.rounds, args.prompts_per_round, args.steps_per_round
    results = []
    for seed in args.seeds:
        sft = sft_model(task, root, args.sft_steps, seed)
        on = run(task, sft, root / f"online-{seed}", args, R, P, S, seed)
        off = run(task, sft, root / f"offline-{seed}", args, 1, R * P, R * S, seed)
        results.append({"seed": seed, "online": on, "offline": off})
        print(f"seed {seed}: SFT {on['gold_init']:.3f}  offline {off['gold']:.3f}  online {on['gold']:.3f}", flush=True)
    diffs = [r["online"]["gold"] - r["offline"]["gold"] for r in results]
    summary = {
        "online_mean": statistics.mean(r["online"]["gold"] for r in results),
        "offline_mean": statistics.mean(r["offline"]["gold"] for r in results),
        "sft_mean": statistics.mean(r["online"]["gold_init"] for r in results),
        "online_minus_offline": diffs,
        "online_wins": sum(d > 0 for d in diffs),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "summary": summary}, indent=1))
    print("\n| seed | SFT | offline DPO | online iterative DPO | online - offline |\n|---|---:|---:|---:|---:|")
    for r, d in zip(results, diffs, strict=False):
        print(
            f"| {r['seed']} | {r['online']['gold_init']:.3f} | {r['offline']['gold']:.3f} | "
            f"{r['online']['gold']:.3f} | {d:+.3f} |"
        )
    print(
        f"| mean | {summary['sft_mean']:.3f} | {summary['offline_mean']:.3f} | {summary['online_mean']:.3f} | "
        f"{statistics.mean(diffs):+.3f} |"
    )


if __name__ == "__main__":
    main()
