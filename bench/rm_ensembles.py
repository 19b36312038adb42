"""Reward-model ensembles against over-optimisation (Coste et al. 2024, "Reward Model Ensembles Help Mitigate
Overoptimization") on the reviews task.

The setting of ``bench/overoptimisation.py`` (PPO, no KL penalty, the same SFT policy and labelled pairs), with the
reward given by k Bradley-Terry reward models that differ only in their seed (head initialisation and batch order),
combined per response as in ``reward.aggregation``:

* ``single``: member 0 alone (the over-optimisation bench's proxy);
* ``mean``:   R = mean_i r_i;
* ``min``:    R = min_i r_i (worst-case optimisation, WCO);
* ``uwo``:    R = mean_i r_i - lambda * var_i r_i (uncertainty-weighted optimisation).

Every checkpoint is evaluated as in the over-optimisation bench (gold and the members' mean score on held-out
samples, KL to the SFT policy). The paper's finding: with an ensemble (WCO, UWO) the gold reward holds up at larger
KL where a single reward model's collapses. ``gold@d`` columns interpolate each run's gold reward linearly at
sqrt KL = d between the two checkpoints (in step order) that first bracket it; nan where the run never got there.

    python bench/rm_ensembles.py               # ~4 min on one CPU thread: writes bench/results/rm_ensembles.*
    python bench/rm_ensembles.py --quick       # seconds, for the tests
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import findings_common as fc  # noqa: E402

NAME = "rm_ensembles"
COLUMNS = ["run", "seed", "step", "sqrt_kl", "kl", "proxy", "proxy_min", "gold", "response_len"]
LEVELS = (2.0, 4.0, 6.0)
SUMMARY = ["run", "seed", "gold_start", "gold_peak", "sqrt_kl_at_peak", "gold_last", "sqrt_kl_last"] + [
    f"gold@{d:g}" for d in LEVELS
]


def gold_at(rows: list[dict], d: float) -> float:
    """Gold reward at sqrt KL = ``d``, linear between the first consecutive checkpoints (by step) that bracket it.

    Example: checkpoints (sqrt_kl, gold) = (0, 1), (2, 3), (4, 0): gold@1 = 1 + (1 - 0) / (2 - 0) * (3 - 1) = 2,
    gold@3 = 3 + (3 - 2) / (4 - 2) * (0 - 3) = 1.5, gold@5 = nan.
    """
    pts = sorted(rows, key=lambda r: r["step"])
    for a, b in zip(pts, pts[1:], strict=False):
        lo, hi = sorted((a["sqrt_kl"], b["sqrt_kl"]))
        if lo <= d <= hi and hi > lo:
            return a["gold"] + (d - a["sqrt_kl"]) / (b["sqrt_kl"] - a["sqrt_kl"]) * (b["gold"] - a["gold"])
    return float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (run, seed), then with several seeds one ``seed = "mean"`` row per run: the mean over seeds of
    each column (nan when a seed's value is nan)."""
    out = []
    for run in dict.fromkeys(r["run"] for r in rows):
        seeds = list(dict.fromkeys(r["seed"] for r in rows if r["run"] == run))
        per = []
        for seed in seeds:
            rs = sorted((r for r in rows if r["run"] == run and r["seed"] == seed), key=lambda r: r["step"])
            peak = max(rs, key=lambda r: r["gold"])
            per.append(
                {
                    "run": run,
                    "seed": seed,
                    "gold_start": rs[0]["gold"],
                    "gold_peak": peak["gold"],
                    "sqrt_kl_at_peak": peak["sqrt_kl"],
                    "gold_last": rs[-1]["gold"],
                    "sqrt_kl_last": rs[-1]["sqrt_kl"],
                    **{f"gold@{d:g}": gold_at(rs, d) for d in LEVELS},
                }
            )
        out += per
        if len(per) > 1:
            out.append({"run": run, "seed": "mean"} | {k: sum(p[k] for p in per) / len(per) for k in SUMMARY[2:]})
    return out


def plot(path: Path, rows: list[dict]) -> None:
    plt = fc.pyplot()
    fig, (ax_g, ax_p) = plt.subplots(1, 2, figsize=(9, 3.4))
    colours = {run: f"C{i}" for i, run in enumerate(dict.fromkeys(r["run"] for r in rows))}
    for run, seed in dict.fromkeys((r["run"], r["seed"]) for r in rows):
        rs = sorted((r for r in rows if r["run"] == run and r["seed"] == seed), key=lambda r: r["step"])
        style = "o-" if seed == rows[0]["seed"] else "s--"
        kw = {"color": colours[run], "label": f"{run}, seed {seed}", "markersize": 4}
        ax_g.plot([r["sqrt_kl"] for r in rs], [r["gold"] for r in rs], style, **kw)
        ax_p.plot([r["sqrt_kl"] for r in rs], [r["proxy"] for r in rs], style, **kw)
    x = "sqrt KL(π || π_sft) (nats^½)"
    ax_g.set(xlabel=x, ylabel="gold reward (held-out samples)", title="gold")
    ax_p.set(xlabel=x, ylabel="mean of the k members' scores", title="proxy (ensemble mean)")
    for ax in (ax_g, ax_p):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = fc.base_parser(__doc__)
    ap.add_argument("--k", type=int, default=4, help="ensemble members")
    ap.add_argument("--uwo-lambda", type=float, default=0.5)
    ap.add_argument("--runs", default="single,mean,min,uwo")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="RL seeds (default: --seed)")
    args, scale, work = fc.parse(ap, argv)
    from alignflow.trainers.rl import train_rl

    s = fc.setup(work, scale)
    k = 2 if args.quick else args.k
    members = [fc.train_rm(s, seed) for seed in range(k)]
    accs = [fc.rm_accuracy(s, m) for m in members]
    ev = fc.Evaluator(s, members)
    start = ev(ev.ref)
    rows: list[dict] = []
    seeds = args.seeds or [args.seed]
    for seed in seeds:
        for run in args.runs.split(","):
            rms, agg = ([members[0]], "mean") if run == "single" else (members, run)
            out_dir = work / f"ens-{run}-k{k}-s{seed}"
            reward = fc.rm_reward(rms, agg, uwo_lambda=args.uwo_lambda)
            with fc.Timer() as t:
                train_rl(fc.rl_config(s, out_dir, {"name": "ppo"}, 0.0, reward, train={"seed": seed}))
            rows += [r | {"seed": seed} for r in fc.curve(ev, out_dir, run, start)]
            print(f"{run} s{seed}: {t.s:.0f}s, gold {rows[-1]['gold']:.3f}, sqrt KL {rows[-1]['sqrt_kl']:.2f}")
    summary = summarise(rows)
    seed_arg = f" --seeds {' '.join(map(str, seeds))}" if args.seeds else ""
    out = Path(args.out)
    text = (
        f"# Reward-model ensembles against over-optimisation (CPU, tiny model)\n\n"
        f"`python bench/rm_ensembles.py{' --quick' if args.quick else ''}{seed_arg}`. k = {k} Bradley-Terry "
        f"members (seeds 0..{k - 1}; held-out accuracy {', '.join(f'{a:.3f}' for a in accs)}), "
        f"uwo λ = {args.uwo_lambda}. PPO, no "
        f"KL penalty, lr {scale.rl_lr}, {scale.rl_rows} responses per step, {scale.rl_steps} steps, RL seed(s) "
        f"{', '.join(map(str, seeds))}; checkpoints every {scale.save_every} steps sampled {scale.eval_samples}x on "
        f"{scale.eval_prompts} held-out prompts.\n\n"
        + fc.md_table(summary, SUMMARY)
        + f"\n![plot]({NAME}.png)\n\nEvery checkpoint:"
    )
    meta = fc.machine(scale) | {"k": k, "uwo_lambda": args.uwo_lambda, "rm_accuracy": accs, "summary": summary}
    payload = fc.write_results(NAME, out, rows, COLUMNS, text, meta)
    plot(out / f"{NAME}.png", rows)
    print(text)
    return payload


if __name__ == "__main__":
    main()
