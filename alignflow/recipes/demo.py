"""``alignflow demo``: the whole pipeline on the built-in ``reviews`` task, in minutes on a laptop CPU.

1. build the task (tokenizer, tiny Llama, SFT corpus, prompts; deterministic from the seed);
2. SFT the tiny model on the corpus;
3. sample two responses per prompt from the SFT policy and label each pair with the hidden gold reward
   through a Bradley-Terry draw (``task.label_noise``), exactly like the papers' synthetic gold-RM setups;
4. train a Bradley-Terry reward model (initialised from the SFT model) on those pairs;
5. online RL (``rl_algo``, RLOO by default) of the SFT policy against that learned reward model (the *proxy*) with a
   KL penalty to the SFT policy, evaluating the hidden gold reward on held-out prompts along the way — the
   proxy/gold gap is the reward over-optimisation of Gao et al. made visible;
6. report: held-out reward-model accuracy against chance and the label-noise ceiling; proxy reward, gold reward
   and KL over RL; samples before and after RL; plots.

Everything lands in ``output_dir``: ``report.md``, ``*.png``, ``sft/``, ``rm/``, ``rl/``, ``pairs_*.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from alignflow.config import DemoConfig, ModelConfig, RLConfig, RMConfig, SFTConfig, from_dict
from alignflow.data.render import encode_pair
from alignflow.eval.evaluate import policy_metrics, reviews_grammatical
from alignflow.eval.frontier import frontier_from_metrics
from alignflow.models import load_causal_lm
from alignflow.models.sequences import score
from alignflow.rollout.sample import sample
from alignflow.tasks import build_task
from alignflow.tasks.common import read_jsonl, write_jsonl
from alignflow.tasks.labels import label_pairs
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rm import train_rm
from alignflow.trainers.run_dir import check_output_dir
from alignflow.trainers.sft import train_sft


def ceiling(rows: list[dict]) -> float:
    """Best achievable expected accuracy on noisy labels: predict the gold-better side, E[max(p, 1 - p)]."""
    return sum(max(r["p_gold"], 1 - r["p_gold"]) for r in rows) / max(1, len(rows))


def agreement_with_gold(model, tokenizer, rows: list[dict], gold) -> float:
    """Share of held-out pairs that the reward model orders like the noise-free gold reward (ties excluded)."""

    def ids(prompt, completion):
        return encode_pair(tokenizer, prompt, completion, max_prompt_len=256, max_len=128).input_ids

    c = score(model, [ids(r["prompt"], r["chosen"]) for r in rows], tokenizer.pad_token_id, model.device)[:, 0]
    j = score(model, [ids(r["prompt"], r["rejected"]) for r in rows], tokenizer.pad_token_id, model.device)[:, 0]
    hits = [
        (bool(a > b) == (gc > gr))
        for a, b, r in zip(c, j, rows, strict=False)
        for gc, gr in [gold([r["prompt"]] * 2, [r["chosen"], r["rejected"]])]
        if gc != gr
    ]
    return sum(hits) / max(1, len(hits))


def plot(path: Path, series: dict, title: str, ylabel: str) -> None:
    """One line per series of values, against the optimiser step (1, 2, ...)."""
    plot_xy(path, {name: (range(1, len(ys) + 1), ys) for name, ys in series.items()}, title, ylabel, "optimiser step")


def bar(path: Path, values: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(list(values), list(values.values()), color=["grey", "tab:blue", "tab:green"][: len(values)])
    for i, v in enumerate(values.values()):
        ax.text(i, v + 0.01, f"{v:.3f}", ha="center")
    ax.set(title=title, ylim=(0, 1.05), ylabel="held-out pairwise accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(cfg: DemoConfig) -> dict:
    out = check_output_dir(cfg.output_dir, "output_dir")  # a re-run replaces the demo's stages (overwrite below)
    times, t = {}, time.perf_counter()
    art = build_task("reviews", cfg.task, out / "task")
    times["task"] = time.perf_counter() - t
    stage("task", times["task"], f"built the reviews task at {out / 'task'}")
    # ---- 1. SFT
    t = time.perf_counter()
    sft = train_sft(
        from_dict(
            SFTConfig,
            {
                "model": {"name_or_path": str(art.model_dir), "tokenizer": str(art.tokenizer_dir)},
                "data": {"path": str(art.sft_path), "max_len": 128, "eval_fraction": 0.05},
                "optim": {"lr": cfg.sft_lr, "warmup_ratio": 0.05},
                "train": {
                    "output_dir": str(out / "sft"),
                    "overwrite": True,
                    "batch_size": cfg.sft_batch_size,
                    "max_steps": cfg.sft_steps,
                    "seed": cfg.seed,
                    "progress": cfg.progress,
                    "log_every": 5,
                },
            },
        )
    )
    times["sft"] = time.perf_counter() - t
    stage("sft", times["sft"], f"{len(sft.losses)} steps, loss {sft.losses[0]:.3f} -> {sft.losses[-1]:.3f}")
    # ---- 2. pairs from SFT samples, labelled by the gold reward
    t = time.perf_counter()
    prompts = [r["prompt"] for r in read_jsonl(art.prompts_path)[: cfg.num_prompts]]
    samples, lengths = sample(
        sft.model, sft.tokenizer, prompts, cfg.samples_per_prompt, cfg.max_new_tokens, cfg.temperature, cfg.seed
    )
    sft_metrics = policy_metrics(prompts, samples, lengths, art.gold_reward, grammatical=reviews_grammatical)
    pairs = label_pairs(prompts, samples, art.gold_reward, cfg.task.label_noise, cfg.seed)
    n_eval = max(1, int(cfg.eval_fraction * len(pairs)))
    write_jsonl(out / "pairs_train.jsonl", pairs[n_eval:])
    write_jsonl(out / "pairs_eval.jsonl", pairs[:n_eval])
    times["sample+label"] = time.perf_counter() - t
    stage(
        "pairs",
        times["sample+label"],
        f"{len(pairs)} pairs from SFT samples, {sft_metrics['eval/grammatical']:.0%} grammatical",
    )
    # ---- 3. reward model
    t = time.perf_counter()
    rm = train_rm(
        from_dict(
            RMConfig,
            {
                "model": {"name_or_path": str(out / "sft" / "model")},
                "data": {
                    "path": str(out / "pairs_train.jsonl"),
                    "eval_path": str(out / "pairs_eval.jsonl"),
                    "max_len": 128,
                },
                "optim": {"lr": cfg.rm_lr, "warmup_ratio": 0.05},
                "train": {
                    "output_dir": str(out / "rm"),
                    "overwrite": True,
                    "batch_size": cfg.rm_batch_size,
                    "max_steps": cfg.rm_steps,
                    "seed": cfg.seed,
                    "progress": cfg.progress,
                    "log_every": 5,
                },
            },
        )
    )
    times["rm"] = time.perf_counter() - t
    stage("rm", times["rm"], f"held-out accuracy {rm.eval.get('eval/accuracy', float('nan')):.3f}")
    gold_agreement = agreement_with_gold(rm.models[0], sft.tokenizer, pairs[:n_eval], art.gold_reward)
    # ---- 4. online RL against the learned reward model
    rl = None
    if cfg.rl_algo != "none":
        t = time.perf_counter()
        rl = run_rl(cfg, out, art)
        times["rl"] = time.perf_counter() - t
        stage(
            cfg.rl_algo,
            times["rl"],
            f"{len(rl.history)} steps, proxy reward "
            f"{(rl.history or [{}])[-1].get('rollout/reward_mean', float('nan')):.3f}",
        )
    # ---- 5. evaluation: untrained, SFT and RL policies sampled on the same held-out prompts; report

    t = time.perf_counter()
    held_out = [r["prompt"] for r in read_jsonl(art.eval_prompts_path)[:128]]
    policies = {"untrained model": load_causal_lm(ModelConfig(name_or_path=str(art.model_dir))), "SFT model": sft.model}
    if rl is not None:
        policies[f"{cfg.rl_algo.upper()} model"] = rl.model
    compare, examples = {}, {}
    for name, model in policies.items():
        ss, ll = sample(model, sft.tokenizer, held_out, 4, cfg.max_new_tokens, cfg.temperature, cfg.seed)
        compare[name] = policy_metrics(held_out, ss, ll, art.gold_reward, grammatical=reviews_grammatical)
        examples[name] = [s[0] for s in ss[:6]]
    times["eval"] = time.perf_counter() - t
    stage("eval", times["eval"], ", ".join(f"{name} gold {m['eval/gold_reward']:.2f}" for name, m in compare.items()))
    summary = {
        "times_s": times,
        "sft": {"final_loss": sft.losses[-1], **sft.eval},
        "sft_samples": sft_metrics,
        "policies": compare,
        "pairs": {"train": len(pairs) - n_eval, "eval": n_eval},
        "rm": rm.eval | {"eval/gold_agreement": gold_agreement},
        "rm_ceiling": ceiling(pairs[:n_eval]),
        "chance": 0.5,
    }
    if rl is not None:
        summary["rl"] = rl_summary(rl)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_report(out, cfg, summary, sft, rm, prompts, samples, held_out[:6], examples)
    base_g = compare["untrained model"]["eval/grammatical"]
    msg = (
        f"\ndemo finished in {sum(times.values()):.0f}s: SFT samples grammatical "
        f"{compare['SFT model']['eval/grammatical']:.0%} (untrained {base_g:.0%}); "
        f"reward model held-out accuracy {rm.eval.get('eval/accuracy', float('nan')):.3f} "
        f"(chance 0.5, label-noise ceiling {summary['rm_ceiling']:.3f}; agrees with the gold ordering on "
        f"{gold_agreement:.1%})"
    )
    if rl is not None:
        r = summary["rl"]
        pol = compare[f"{cfg.rl_algo.upper()} model"]["eval/gold_reward"]
        msg += (
            f"; {cfg.rl_algo.upper()} against the reward model: gold reward on held-out prompts "
            f"{compare['SFT model']['eval/gold_reward']:.3f} (SFT) -> {pol:.3f}, KL to SFT {r['kl_end']:.2f}"
        )
    print(msg + f". Report: {out / 'report.md'}")
    return summary


def stage(name: str, seconds: float, headline: str) -> None:
    """One line per finished stage (also with progress bars off): stage, time, headline number."""
    print(f"demo | {name:<6} | {seconds:6.1f} s | {headline}", flush=True)


def run_rl(cfg: DemoConfig, out: Path, art):
    """The RL stage: the SFT policy optimised against the demo's reward model (the proxy), KL-regularised to the SFT
    policy; the built-in task's held-out prompts are decoded greedily every ``rl_eval_every`` steps and scored by
    both the proxy and the hidden gold reward."""
    critic = cfg.rl_algo in ("ppo", "safe_ppo")
    n = 1 if critic else cfg.rl_n
    prompts = max(1, cfg.rl_rows_per_step // n)
    return train_rl(
        from_dict(
            RLConfig,
            {
                "model": {"name_or_path": str(out / "sft" / "model")},
                "task": {"name": "reviews"},  # its reward table; the prompts are the demo task's own files
                "data": {"path": str(art.prompts_path), "eval_path": str(art.eval_prompts_path)},
                # PPO: 2 epochs of 2 mini-batches per rollout batch; group methods: one update per batch (their papers')
                "algo": {"name": cfg.rl_algo, "ppo_epochs": 2 if critic else 1},
                "kl": {"coef": cfg.rl_kl_coef},
                "rollout": {
                    "prompts_per_step": prompts,
                    "n": n,
                    "max_new_tokens": cfg.max_new_tokens,
                    "temperature": cfg.temperature,
                    "eval_prompts": 64,
                },
                # the gold reward rides along with weight 0: logged on every step's samples, never optimised
                "reward": {"models": [str(out / "rm" / "model")], "task": {"gold": 0.0}},
                "optim": {"lr": cfg.rl_lr, "scheduler": "constant"},
                "critic": {"optim": {"lr": 1e-3, "scheduler": "constant"}},  # initialised from the reward model
                "train": {
                    "output_dir": str(out / "rl"),
                    "overwrite": True,
                    "batch_size": prompts * n // (2 if critic else 1),
                    "max_steps": cfg.rl_steps,
                    "eval_every": cfg.rl_eval_every,
                    "seed": cfg.seed,
                    "progress": cfg.progress,
                    "log_every": 1,
                },
            },
        )
    )


def rl_summary(rl) -> dict:
    """Per-step proxy reward, gold reward (on the step's own samples) and KL; the greedy held-out evaluations; and
    start/end values (start: the SFT policy's samples at step 1; end: the mean of the last 3 steps)."""

    def col(key):
        return [m.get(key, float("nan")) for m in rl.history]

    def tail(xs):
        return sum(xs[-3:]) / max(1, len(xs[-3:]))

    proxy, gold, kl = col("rollout/reward_mean"), col("rollout/reward_gold_mean"), col("policy/kl")
    return {
        "proxy_reward": proxy,
        "gold_reward": gold,
        "kl": kl,
        "eval_steps": [s for s, _ in rl.evals],
        "eval_gold": [m.get("eval/gold_reward", float("nan")) for _, m in rl.evals],
        "eval_proxy": [m.get("eval/reward_mean", float("nan")) for _, m in rl.evals],
        "gold_start": gold[0],
        "gold_end": tail(gold),
        "proxy_start": proxy[0],
        "proxy_end": tail(proxy),
        "kl_end": tail(kl),
        "kl_max": max(kl) if kl else float("nan"),
    }


def plot_xy(path: Path, series: dict, title: str, ylabel: str, xlabel: str = "RL step") -> None:
    """Like :func:`plot`, for series given as (xs, ys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path,
    cfg: DemoConfig,
    s: dict,
    sft,
    rm,
    prompts: list[str],
    samples: list[list[str]],
    held_out: list[str],
    examples: dict,
) -> None:
    plot(out / "sft_loss.png", {"train NLL": sft.losses}, "SFT loss", "token-mean NLL")
    plot(out / "rm_loss.png", {"train BT loss": rm.losses}, "Reward-model loss", "BT loss")
    acc = s["rm"].get("eval/accuracy", float("nan"))
    bar(
        out / "rm_accuracy.png",
        {"chance": 0.5, "reward model": acc, "label-noise ceiling": s["rm_ceiling"]},
        "Reward model on held-out pairs",
    )
    lines = [
        "# alignflow demo report",
        "",
        f"Task `reviews` (seed {cfg.seed}, label noise {cfg.task.label_noise}). Stage times (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in s["times_s"].items())
        + f"; total {sum(s['times_s'].values()):.1f}.",
        "",
        "## 1. SFT",
        "",
        f"Final train NLL {s['sft']['final_loss']:.3f}; held-out NLL {s['sft'].get('eval/loss', float('nan')):.3f} "
        f"(perplexity {s['sft'].get('eval/perplexity', float('nan')):.2f}).",
        "",
        "![SFT loss](sft_loss.png)",
        "",
        "SFT samples:",
        "",
        *[f"- `{p}` → `{ss[0]}`" for p, ss in list(zip(prompts, samples, strict=False))[:6]],
        "",
        "## 2. Reward model",
        "",
        f"{s['pairs']['train']} training pairs and {s['pairs']['eval']} held-out pairs, sampled from the SFT model "
        "and labelled by the hidden gold reward through a Bradley–Terry draw.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| held-out accuracy | {acc:.3f} |",
        "| chance | 0.500 |",
        f"| label-noise ceiling E[max(p, 1-p)] | {s['rm_ceiling']:.3f} |",
        f"| agreement with the noise-free gold ordering | {s['rm']['eval/gold_agreement']:.3f} |",
        f"| mean margin r_c - r_r | {s['rm'].get('eval/margin', float('nan')):.3f} |",
        f"| calibration error (ECE) | {s['rm'].get('eval/ece', float('nan')):.3f} |",
        "",
        "![RM loss](rm_loss.png) ![RM accuracy](rm_accuracy.png)",
        "",
    ]
    if "rl" in s:
        r, algo = s["rl"], cfg.rl_algo.upper()
        steps = list(range(1, len(r["proxy_reward"]) + 1))
        plot_xy(
            out / "rl_reward.png",
            {
                "proxy (RM) on samples": (steps, r["proxy_reward"]),
                "gold on samples": (steps, r["gold_reward"]),
                "proxy (RM), greedy held-out": (r["eval_steps"], r["eval_proxy"]),
                "gold, greedy held-out": (r["eval_steps"], r["eval_gold"]),
            },
            f"{algo} against the learned reward model",
            "reward",
        )
        plot_xy(
            out / "rl_kl.png",
            {"KL(policy || SFT) per sequence": (steps, r["kl"])},
            f"{algo}: KL to the SFT policy",
            "nats",
        )

        frontier_from_metrics([out / "rl"], out / "rl_frontier.png", reward_key="rollout/reward_gold_mean")
        lines += [
            f"## 3. Online RL ({algo}) against the reward model",
            "",
            f"{cfg.rl_steps} steps of {algo} from the SFT policy, rewarded by the reward model above (the proxy), "
            f"KL coefficient {cfg.rl_kl_coef} to the SFT policy, learning rate {cfg.rl_lr}. Every {cfg.rl_eval_every} "
            "steps, 64 held-out prompts are decoded greedily and scored by the proxy and by the hidden gold reward.",
            "",
            "| on the policy's own samples | step 1 (SFT policy) | last 3 steps | change |",
            "|---|---|---|---|",
            f"| gold reward (hidden, never optimised) | {r['gold_start']:.3f} | {r['gold_end']:.3f} | "
            f"{r['gold_end'] - r['gold_start']:+.3f} |",
            f"| proxy reward (the reward model) | {r['proxy_start']:.3f} | {r['proxy_end']:.3f} | "
            f"{r['proxy_end'] - r['proxy_start']:+.3f} |",
            f"| KL to SFT (nats per sequence) | 0 | {r['kl_end']:.3f} | max {r['kl_max']:.3f} |",
            "",
            "Greedy decoding of held-out prompts (gold / proxy) at steps "
            + ", ".join(
                f"{st}: {g:.2f} / {p:.2f}"
                for st, g, p in zip(r["eval_steps"], r["eval_gold"], r["eval_proxy"], strict=False)
            )
            + ". Greedy decoding of so small a model falls into loops of repeated phrases, which the gold reward "
            "penalises, and more so as RL sharpens the policy; the sampled numbers above are what RL optimises and "
            "the better guide.",
            "",
            "![RL reward](rl_reward.png) ![RL KL](rl_kl.png)",
            "",
            "The reward–KL frontier of the run (gold reward on each step's samples against that step's KL to the SFT "
            "policy; `alignflow eval frontier=...` draws the same from checkpoints):",
            "",
            "![reward-KL frontier](rl_frontier.png)",
            "",
        ]
    lines += [
        f"## 4. Policies compared (4 samples for each of 128 held-out prompts, temperature {cfg.temperature})",
        "",
        "| policy | grammatical | gold reward | length (tokens) | distinct-2 |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {m['eval/grammatical']:.1%} | {m['eval/gold_reward']:.3f} | {m['eval/response_len']:.1f} | "
            f"{m['eval/distinct_2']:.3f} |"
            for name, m in s["policies"].items()
        ],
        "",
        "Samples on held-out prompts (first sample of each policy):",
        "",
    ]
    for i, p in enumerate(held_out):
        lines.append(f"- `{p}`")
        lines += [f"  - {name}: `{ex[i]}`" for name, ex in examples.items() if name != "untrained model"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
