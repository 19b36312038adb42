"""alignflow's GRPO, RLOO and DPO against TRL's on the reviews task: the gold reward reached at equal KL.

Same task, model, data and budget on both sides (``findings_common``: the SFT policy of the other finding benches):

* GRPO and RLOO: the task's gold reward as the training reward (TRL through a ``reward_funcs`` wrapper around the
  same function, ``bench_rl.trl_gold_reward``), the same prompt stream in the same order (``bench_rl.trl_prompts``),
  ``prompts`` prompts x ``group`` samples per step, <= 24 new tokens, temperature 1, one optimiser step per
  generation batch, AdamW lr ``lr`` constant, no weight decay, grad-norm clip 1, ``steps`` steps. KL as in
  ``bench_rl`` (TRL's only forms): GRPO beta 0.04 with k3 in the loss, clip 0.2, TRL ``loss_type="grpo"``
  (alignflow's per-sequence token mean); RLOO beta 0.03 with k1 in the reward.
* DPO: the gold-labelled pairs of the other benches, sigmoid loss, beta 0.1, 32 pairs per step, lr 5e-4 constant,
  reference log-probs computed once; TRL is given alignflow's token ids (``bench_dpo._trl_dataset``).

Both sides save the policy every ``steps / 8`` steps; every saved policy (and the SFT start) is sampled on the
held-out prompts with the same seed, so each side has a gold-against-KL curve. "At equal KL": the largest KL both
curves reach, K = min(max KL of each side); each side's gold there is interpolated linearly in sqrt KL between the
two checkpoints (in step order) that first bracket it (``rm_ensembles.gold_at``).

    python bench/vs_trl_gold.py            # ~6 min on one CPU thread: writes bench/results/vs_trl_gold.*
    python bench/vs_trl_gold.py --quick    # seconds, for the tests
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import findings_common as fc  # noqa: E402
from rm_ensembles import gold_at  # noqa: E402

NAME = "vs_trl_gold"
COLUMNS = ["algo", "side", "step", "kl", "sqrt_kl", "gold", "gold_se", "response_len"]
SUMMARY = ["algo", "side", "train_s", "gold_final", "kl_final", "equal_kl", "gold_at_equal_kl"]
RL = {
    "grpo": (
        {"name": "grpo", "clip_low": 0.2, "clip_high": 0.2, "ppo_epochs": 1},
        {"coef": 0.04, "placement": "loss", "estimator": "k3"},
    ),
    "rloo": ({"name": "rloo"}, {"coef": 0.03, "placement": "reward", "estimator": "k1"}),
}


def alignflow_rl(s: fc.Setup, out: Path, algo: str, a) -> None:
    from alignflow.config import RLConfig, from_dict
    from alignflow.trainers.rl import train_rl

    algo_cfg, kl = RL[algo]
    cfg = {
        "model": {"name_or_path": str(s.sft), "tokenizer": str(s.task.tokenizer_dir)},
        "task": {"name": "reviews"},
        "data": {"path": str(s.task.prompts_path), "eval_fraction": 0.0},
        "algo": algo_cfg,
        "kl": kl,
        "rollout": {
            "prompts_per_step": a.prompts,
            "n": a.group,
            "max_new_tokens": s.scale.new_tokens,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "eval_prompts": 0,
        },
        "reward": {"task": {"gold": 1.0}},
        "optim": {"lr": a.lr, "scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": fc._quiet_train(out, a.steps, a.prompts * a.group, 0, save_every=a.save_every),
    }
    train_rl(from_dict(RLConfig, cfg))


def _trl_common(out: Path, a, steps: int, lr: float) -> dict:
    return dict(
        output_dir=str(out),
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        logging_steps=10**6,
        report_to="none",
        save_strategy="steps",
        save_steps=a.save_every,
        save_only_model=True,
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=0,
    )


def trl_rl(s: fc.Setup, out: Path, algo: str, a) -> None:
    import torch
    from bench_rl import trl_gold_reward, trl_prompts
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    algo_cfg, kl = RL[algo]
    wl = {"prompts_path": str(s.task.prompts_path)}
    texts = trl_prompts(SimpleNamespace(batch=a.prompts, warmup=0, steps=a.steps), wl, s.tok)
    settings = {
        "num_generations": a.group,
        "per_device_train_batch_size": a.prompts * a.group,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": 1,
        "num_iterations": 1,
        "max_completion_length": s.scale.new_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "beta": kl["coef"],
        "epsilon": algo_cfg.get("clip_low", 0.2),
        "shuffle_dataset": False,
        "activation_checkpointing": False,
        "log_completions": False,
    }
    if algo == "grpo":
        settings["loss_type"] = "grpo"
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
    targs = config_cls(**_trl_common(out, a, a.steps, a.lr), **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(s.sft), dtype=torch.float32)
    trainer = trainer_cls(
        model=model,
        reward_funcs=trl_gold_reward,
        args=targs,
        train_dataset=Dataset.from_dict({"prompt": texts}),
        processing_class=s.tok,
    )
    trainer.train()


def trl_dpo(s: fc.Setup, out: Path, a) -> None:
    import torch
    from bench_dpo import _trl_dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    class PreTokenised(DPOTrainer):
        def _prepare_dataset(self, dataset, *_, **__):  # alignflow's token ids, already in TRL's columns
            return dataset

    _, ds = _trl_dataset({"tokenizer_dir": str(s.task.tokenizer_dir), "pairs_path": str(s.pairs_train)}, False)
    targs = DPOConfig(
        **_trl_common(out, a, a.dpo_steps, 5e-4),
        per_device_train_batch_size=32,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=256,
        activation_checkpointing=False,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=32,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(s.sft), dtype=torch.float32)
    PreTokenised(model=model, args=targs, train_dataset=ds, processing_class=s.tok).train()


def policies(out: Path, side: str) -> list[tuple[int, Path]]:
    """(step, policy directory) of a run: alignflow's checkpoints/step-N, TRL's checkpoint-N."""
    if side == "alignflow":
        return fc.checkpoints(out)
    found = [(int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return sorted(found)


def summarise(rows: list[dict], times: dict) -> list[dict]:
    out = []
    for algo in dict.fromkeys(r["algo"] for r in rows):
        curves = {
            side: sorted((r for r in rows if r["algo"] == algo and r["side"] == side), key=lambda r: r["step"])
            for side in ("alignflow", "TRL")
        }
        equal = min(max(r["kl"] for r in c) for c in curves.values())
        for side, c in curves.items():
            out.append(
                {
                    "algo": algo,
                    "side": side,
                    "train_s": times[(algo, side)],
                    "gold_final": c[-1]["gold"],
                    "kl_final": c[-1]["kl"],
                    "equal_kl": equal,
                    "gold_at_equal_kl": gold_at(c, math.sqrt(equal)),
                }
            )
    return out


def plot(path: Path, rows: list[dict]) -> None:
    plt = fc.pyplot()
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    fig, axes = plt.subplots(1, len(algos), figsize=(3.4 * len(algos), 3.3), squeeze=False)
    for ax, algo in zip(axes[0], algos, strict=False):
        for side, style in (("alignflow", "o-"), ("TRL", "s--")):
            c = sorted((r for r in rows if r["algo"] == algo and r["side"] == side), key=lambda r: r["step"])
            ax.plot([r["kl"] for r in c], [r["gold"] for r in c], style, label=side)
        ax.set(title=algo.upper(), xlabel="KL(π || π_sft) (nats)", ylabel="gold reward")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = fc.base_parser(__doc__)
    ap.add_argument("--algos", default="grpo,rloo,dpo")
    ap.add_argument("--steps", type=int, default=80, help="GRPO / RLOO steps")
    ap.add_argument("--dpo-steps", type=int, default=56)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    a, scale, work = fc.parse(ap, argv)
    if a.quick:
        a.steps, a.dpo_steps, a.prompts, a.group = 2, 2, 2, 2
    a.save_every = max(1, a.steps // 8)
    from dpo_vs_ppo_frontier import dpo

    s = fc.setup(work, scale)
    ev = fc.Evaluator(s, [])
    start = ev(ev.ref)
    rows, times = [], {}
    for algo in a.algos.split(","):
        for side in ("alignflow", "TRL"):
            out = work / f"vs-trl-{algo}-{side}-{a.steps}"
            with fc.Timer() as t:
                if algo == "dpo":
                    a.save_every = max(1, a.dpo_steps // 8)
                    dpo(s, out, 0.1, a.dpo_steps, 0, a.save_every) if side == "alignflow" else trl_dpo(s, out, a)
                else:
                    a.save_every = max(1, a.steps // 8)
                    (alignflow_rl if side == "alignflow" else trl_rl)(s, out, algo, a)
            times[(algo, side)] = t.s
            rows.append({"algo": algo, "side": side, "step": 0, **start})
            rows += [{"algo": algo, "side": side, "step": st, **ev(ev.policy(p))} for st, p in policies(out, side)]
            print(f"{algo} {side}: {t.s:.0f}s, gold {rows[-1]['gold']:.3f} kl {rows[-1]['kl']:.2f}", flush=True)
    summary = summarise(rows, times)
    se = sum(r["gold_se"] for r in rows) / len(rows)
    text = (
        "# alignflow against TRL: gold reward at equal KL (CPU, tiny model)\n\n"
        f"`python bench/vs_trl_gold.py{' --quick' if a.quick else ''}`. GRPO / RLOO: {a.prompts} prompts x "
        f"{a.group} samples per step, {a.steps} steps, lr {a.lr}, gold reward as the training reward. DPO: "
        f"{a.dpo_steps} steps of 32 gold-labelled pairs, beta 0.1, lr 5e-4. Policies saved every eighth of the run, "
        f"sampled {scale.eval_samples}x on {scale.eval_prompts} held-out prompts (SFT start: gold "
        f"{start['gold']:.3f}). `equal_kl`: the largest KL both sides reach; `gold_at_equal_kl`: each side's gold "
        f"there. Standard error of one policy's gold mean: {se:.3f} on average.\n\n"
        + fc.md_table(summary, SUMMARY)
        + f"\n![plot]({NAME}.png)\n\nEvery evaluated policy:"
    )
    meta = fc.machine(scale) | {"summary": summary, "args": {k: v for k, v in vars(a).items()}}
    payload = fc.write_results(NAME, Path(a.out), rows, COLUMNS, text, meta)
    plot(Path(a.out) / f"{NAME}.png", rows)
    print(text)
    return payload


if __name__ == "__main__":
    main()
