"""PF-PPO against PPO at an equal number of generated samples (Zhang, Shen et al., "Policy Filtration for RLHF to
Mitigate Noise in Reward Models").

Every run optimises the same learned reward model (``findings_common``: the Bradley-Terry proxy of the reviews
task, trained on noisy gold labels) from the same SFT policy, KL coefficient 0.05 in the reward, the same lr and
critic (initialised from the reward model), and generates the same ``rows`` responses per RL step:

* ``ppo``: ``rows`` prompts x 1 sample, all trained on (2 epochs x 2 mini-batches);
* ``pf_best_random`` / ``pf_best_worst``: ``rows / 4`` prompts x 4 samples, the filter keeps 2 per prompt (the
  best and one drawn at random, or the best and the worst), so half the rows are trained on (2 epochs x 2
  mini-batches of the kept rows);
* ``pf_best`` (with ``--with-best``): the best sample of each prompt only, a quarter of the rows.

Measured per run:

* ``gold`` / ``proxy`` / ``kl``: the final policy sampled on held-out prompts (gold: the task's hidden reward,
  never optimised; proxy: the reward model; kl: nats per sequence to the SFT policy); ``best_gold`` the highest
  gold over the run's checkpoints (every ``save_every`` steps) and its step;
* ``train_s``: wall time of ``train_rl``;
* ``rm_acc_b0`` .. ``rm_acc_b3``: the reward model's reliability per reward quarter, as PF-PPO's paper motivates
  it: the SFT policy samples 4 responses per held-out prompt, the rows are cut into quarters by the reward
  model's score, and in each quarter the share of (row, other sample of the same prompt) pairs the reward model
  orders like the gold reward (``algorithms.filtration.bucket_accuracy``). Reported once (the SFT policy's
  samples), with the training-time means of ``pf/rm_acc_bucket<k>`` for the PF runs in the json.

    python bench/pf_ppo_vs_ppo.py --with-best --seeds 3   # ~80 s of CPU on one thread: bench/results/pf_ppo_vs_ppo.*
    python bench/pf_ppo_vs_ppo.py --quick    # seconds, for the tests
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import findings_common as fc  # noqa: E402

NAME = "pf_ppo_vs_ppo"
COLUMNS = [
    "run",
    "seed",
    "filter",
    "prompts_x_n",
    "trained_rows",
    "train_s",
    "gold",
    "gold_se",
    "best_gold",
    "best_step",
]
COLUMNS += ["proxy", "kl"]
BUCKETS = 4
N = 4  # samples per prompt of the PF runs (the paper's N = 5 does not divide the row counts here)
RUNS = {"ppo": "none", "pf_best_random": "best_random", "pf_best_worst": "best_worst", "pf_best": "best"}


def kept_rows(mode: str, rows: int) -> int:
    """Rows trained on per step out of ``rows`` generated: all (none), 2 of every N (best_random, best_worst), 1 of
    every N (best). E.g. rows 32, N 4: 32, 16, 16, 8."""
    return {"none": rows, "best_random": 2 * rows // N, "best_worst": 2 * rows // N, "best": rows // N}[mode]


def config(s: fc.Setup, work: Path, run: str, rm: Path, seed: int):
    mode, rows = RUNS[run], s.scale.rl_rows
    n = 1 if mode == "none" else N
    algo = {"name": "ppo" if mode == "none" else "pf_ppo", "ppo_epochs": 2}
    if mode != "none":
        algo["sample_filter"] = mode
    return fc.rl_config(
        s,
        work / f"pf-{run}-s{seed}",
        algo,
        0.05,
        fc.rm_reward([rm]),
        rollout={"n": n, "prompts_per_step": rows // n},
        train={"seed": seed, "batch_size": max(1, kept_rows(mode, rows) // 2)},
    )


def reliability(s: fc.Setup, ev: fc.Evaluator, seed: int = 4321) -> list[tuple[float, int]]:
    """(accuracy, pairs) per reward-model quarter on N SFT samples of each held-out prompt."""
    import torch

    from alignflow.algorithms.filtration import bucket_accuracy
    from alignflow.rollout.sample import sample_batch

    with torch.no_grad():
        b = sample_batch(ev.ref, s.tok, ev.prompt_ids, N, s.scale.new_tokens, 1.0, seed)
        proxy = ev.rm.member_scores(b).mean(-1)  # (B,)
    prompts = [p for p in ev.prompts for _ in range(N)]
    gold = torch.tensor(s.task.gold_reward(prompts, b["response"]), dtype=torch.double)
    groups = torch.arange(len(ev.prompts)).repeat_interleave(N)
    return bucket_accuracy(proxy, gold, groups, BUCKETS)


def one_run(s: fc.Setup, work: Path, run: str, rm: Path, seed: int, ev: fc.Evaluator, start: dict) -> dict:
    from alignflow.trainers.rl import train_rl

    cfg = config(s, work, run, rm, seed)
    with fc.Timer() as t:
        res = train_rl(cfg)
    hist = res.history
    del res
    curve = fc.curve(ev, Path(cfg.train.output_dir), run, start)
    final = ev(ev.policy(Path(cfg.train.output_dir) / "model"))
    best = max(curve, key=lambda r: r["gold"])
    train_acc = {}
    for k in range(BUCKETS):
        xs = [m[f"pf/rm_acc_bucket{k}"] for m in hist if f"pf/rm_acc_bucket{k}" in m]
        train_acc[f"rm_acc_b{k}"] = statistics.fmean(xs) if xs else math.nan
    return {
        "run": run,
        "seed": seed,
        "filter": RUNS[run],
        "prompts_x_n": f"{cfg.rollout.prompts_per_step}x{cfg.rollout.n}",
        "trained_rows": kept_rows(RUNS[run], s.scale.rl_rows),
        "train_s": t.s,
        "best_gold": best["gold"],
        "best_step": best["step"],
        **{k: final[k] for k in ("gold", "gold_se", "proxy", "kl")},
        "train_rm_acc": train_acc,
        "curve": curve,
    }


def summarise(name: str, runs: list[dict]) -> dict:
    """Means over a method's seeds of the final and the best gold, the proxy and the KL."""
    out = {"run": name, "seeds": len(runs)}
    for k in ("gold", "best_gold", "proxy", "kl"):
        out[k] = statistics.fmean(r[k] for r in runs)
    return out


def plot(path: Path, runs: list[dict], acc: list[tuple[float, int]]) -> None:
    plt = fc.pyplot()
    fig, (ax_g, ax_a) = plt.subplots(1, 2, figsize=(9, 3.4))
    colours = {name: f"C{i}" for i, name in enumerate(RUNS)}
    for r in runs:  # a colour per method, a line style per seed
        style = ("-", "--", ":", "-.")[r["seed"] % 4]
        xs, ys = [c["step"] for c in r["curve"]], [c["gold"] for c in r["curve"]]
        ax_g.plot(xs, ys, style, marker=".", color=colours[r["run"]], label=f"{r['run']} s{r['seed']}")
    ax_g.set(xlabel="RL step", ylabel="held-out gold reward", title="gold along training")
    ax_g.legend(fontsize=6, ncol=2)
    ax_a.bar(range(len(acc)), [a for a, _ in acc])
    ax_a.axhline(0.5, color="grey", ls="--", lw=1)
    ax_a.set(xlabel="reward-model quarter (0 lowest)", ylabel="pairwise accuracy vs gold", title="RM reliability")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = fc.base_parser(__doc__)
    ap.add_argument("--steps", type=int, default=40, help="RL steps per run (each generates the same rows)")
    ap.add_argument("--with-best", action="store_true", help="also the best-only filter (one row per prompt)")
    ap.add_argument("--seeds", type=int, default=1, help="RL seeds per method (--seed, --seed + 1, ...)")
    args, scale, work = fc.parse(ap, argv)
    if not args.quick:
        scale = dataclasses.replace(scale, rl_steps=args.steps)
    s = fc.setup(work, scale)
    rm = fc.train_rm(s, 0)
    rm_acc = fc.rm_accuracy(s, rm)
    ev = fc.Evaluator(s, [rm])
    acc = reliability(s, ev)
    start = ev(ev.ref)
    names = ["ppo", "pf_best_random", "pf_best_worst"] + (["pf_best"] if args.with_best else [])
    seeds = range(args.seed, args.seed + args.seeds)
    runs = [one_run(s, work, name, rm, seed, ev, start) for name in names for seed in seeds]
    rows = [{k: r[k] for k in COLUMNS} for r in runs]
    summary = [summarise(name, [r for r in runs if r["run"] == name]) for name in names]
    acc_text = ", ".join(f"{a:.3f} ({n} pairs)" for a, n in acc)
    means = "; ".join(f"{m['run']} final {m['gold']:.3f}, best {m['best_gold']:.3f}, KL {m['kl']:.2f}" for m in summary)
    command = " ".join(["python bench/pf_ppo_vs_ppo.py", *(argv if argv is not None else sys.argv[1:])])
    text = (
        "# PF-PPO against PPO at an equal number of generated samples (CPU, tiny model)\n\n"
        f"`{command}`. Reviews task, {scale.layers}-layer "
        f"{scale.hidden}-wide Llama after SFT; Bradley-Terry reward model (held-out label accuracy {rm_acc:.3f}) "
        f"as the training reward, the gold reward never optimised. {scale.rl_steps} RL steps of {scale.rl_rows} "
        f"generated responses for every run (PPO {scale.rl_rows} prompts x 1; PF-PPO {scale.rl_rows // N} prompts "
        f"x {N}, filtered), KL 0.05 in the reward, lr {scale.rl_lr}, 2 epochs x 2 mini-batches of the trained rows, "
        f"seeds {list(seeds)}, 1 torch thread. gold / proxy / kl: the final policy on {scale.eval_prompts} held-out "
        f"prompts x {scale.eval_samples} samples (SFT start: gold {start['gold']:.3f}); best_gold: the best "
        f"checkpoint (every {scale.save_every} steps); train_s: wall time, which on a shared machine depends on "
        "its load more than on the method.\n\n"
        f"Reward-model reliability on {N} SFT samples of each held-out prompt, pairwise accuracy against the gold "
        f"reward per reward quarter (lowest to highest): {acc_text}.\n\n"
        f"Held-out gold, mean over seeds: {means}.\n\n"
        f"![plot]({NAME}.png)"
    )
    meta = fc.machine(scale) | {
        "rm_heldout_accuracy": rm_acc,
        "rm_bucket_accuracy": [{"accuracy": a, "pairs": n} for a, n in acc],
        "train_rm_bucket_accuracy": {r["run"]: r["train_rm_acc"] for r in runs},
        "sft_start": start,
        "summary": summary,
        "curves": {f"{r['run']}-s{r['seed']}": r["curve"] for r in runs},
    }
    payload = fc.write_results(NAME, Path(args.out), rows, COLUMNS, text, meta)
    plot(Path(args.out) / f"{NAME}.png", runs, acc)
    print(text)
    return payload


if __name__ == "__main__":
    main()
