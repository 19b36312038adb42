"""The reward-KL frontier of DPO against PPO on the reviews task (DPO paper, Rafailov et al. 2023, figure 2 left:
reward against KL to the reference for DPO at several beta and PPO at several KL targets).

Both learn from the same ~900 gold-labelled pairs of SFT samples (``findings_common``):

* DPO (``alignflow po``, sigmoid loss) trains on the pairs directly, one run per beta, reference = the SFT policy;
* PPO (``alignflow rl``) optimises the Bradley-Terry reward model trained on those pairs, one run per KL coefficient
  (per-token k1 penalty in the reward).

Each run's final policy is sampled on the held-out prompts (the same seed for all): gold reward (never optimised
by either) against KL(pi || pi_sft) per sequence on those samples. A point further up and to the left is the
better trade-off. PPO's intermediate checkpoints are in the JSON as well (``final`` false).

    python bench/dpo_vs_ppo_frontier.py           # ~6 min on one CPU thread: writes bench/results/dpo_vs_ppo_frontier.*
    python bench/dpo_vs_ppo_frontier.py --quick   # seconds, for the tests
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import findings_common as fc  # noqa: E402

NAME = "dpo_vs_ppo_frontier"
COLUMNS = ["method", "setting", "step", "final", "kl", "sqrt_kl", "gold", "proxy", "response_len", "train_s"]


def dpo(s: fc.Setup, out: Path, beta: float, steps: int, seed: int, save_every: int = 0) -> None:
    from alignflow.config import POConfig, from_dict
    from alignflow.trainers.po import train_po

    cfg = {
        "model": {"name_or_path": str(s.sft), "tokenizer": str(s.task.tokenizer_dir)},
        "data": {"path": str(s.pairs_train), "max_len": 64, "eval_fraction": 0.0},
        "loss": {"name": "dpo", "beta": beta},
        "optim": {"lr": 5e-4, "scheduler": "constant"},
        "ref_cache": False,
        "train": fc._quiet_train(out, steps, 32, seed, save_every=save_every),
    }
    train_po(from_dict(POConfig, cfg))


def plot(path: Path, rows: list[dict]) -> None:
    plt = fc.pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for method, marker in (("DPO", "s"), ("PPO", "o")):
        pts = sorted((r for r in rows if r["method"] == method and r["final"]), key=lambda r: r["kl"])
        ax.plot([r["kl"] for r in pts], [r["gold"] for r in pts], marker + "-", label=method)
        for r in pts:
            ax.annotate(r["setting"], (r["kl"], r["gold"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    cps = [r for r in rows if r["method"] == "PPO"]
    ax.scatter(
        [r["kl"] for r in cps], [r["gold"] for r in cps], s=8, c="tab:orange", alpha=0.35, label="PPO checkpoints"
    )
    start = next(r for r in rows if r["method"] == "SFT")
    ax.plot([0], [start["gold"]], "k*", label="SFT")
    ax.set(xlabel="KL(π || π_sft) per sequence (nats)", ylabel="gold reward (held-out samples)")
    ax.set_title("reward-KL frontier: DPO (β) vs PPO (KL coef)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(rows: list[dict]) -> str:
    """One sentence: DPO's best final policy against the best PPO policy (any checkpoint) within DPO's KL range."""
    dpo_rows = [r for r in rows if r["method"] == "DPO"]
    if not dpo_rows:
        return ""
    top = max(r["kl"] for r in dpo_rows)
    best_dpo = max(dpo_rows, key=lambda r: r["gold"])
    ppo = [r for r in rows if r["method"] == "PPO" and r["kl"] <= top]
    best_ppo = max(ppo, key=lambda r: r["gold"]) if ppo else None
    ppo_text = (
        f"the best PPO policy (any checkpoint) at KL <= {top:.2f} reached {best_ppo['gold']:.3f} "
        f"({best_ppo['setting']}, step {best_ppo['step']}, KL {best_ppo['kl']:.2f})"
        if best_ppo
        else f"no PPO checkpoint stayed within KL {top:.2f}"
    )
    best_all = max((r for r in rows if r["method"] == "PPO"), key=lambda r: r["gold"], default=None)
    far = f"; PPO's best anywhere: {best_all['gold']:.3f} at KL {best_all['kl']:.2f}" if best_all else ""
    return (
        f"DPO's best: gold {best_dpo['gold']:.3f} ({best_dpo['setting']}, KL {best_dpo['kl']:.2f}); within DPO's KL "
        f"range ({top:.2f} nats) {ppo_text}{far}."
    )


def main(argv=None) -> dict:
    ap = fc.base_parser(__doc__)
    ap.add_argument("--betas", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--kl-coefs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--dpo-steps", type=int, default=56, help="2 epochs of the ~900 pairs at 32 per step")
    args, scale, work = fc.parse(ap, argv)
    from alignflow.trainers.rl import train_rl

    s = fc.setup(work, scale)
    rm = fc.train_rm(s, 0)
    ev = fc.Evaluator(s, [rm])
    rows = [{"method": "SFT", "setting": "-", "step": 0, "final": True, "train_s": 0.0, **ev(ev.ref)}]
    betas, coefs = (args.betas[:1], args.kl_coefs[:1]) if args.quick else (args.betas, args.kl_coefs)
    for beta in betas:
        out = work / f"frontier-dpo-b{beta}-s{args.seed}"
        steps = scale.po_steps if args.quick else args.dpo_steps
        with fc.Timer() as t:
            dpo(s, out, beta, steps, args.seed)
        rows.append(
            {"method": "DPO", "setting": f"β={beta:g}", "step": steps, "final": True, "train_s": t.s}
            | ev(ev.policy(out / "model"))
        )
        print(f"DPO beta {beta}: {t.s:.0f}s gold {rows[-1]['gold']:.3f} kl {rows[-1]['kl']:.2f}", flush=True)
    for coef in coefs:
        out = work / f"frontier-ppo-kl{coef}-s{args.seed}"
        with fc.Timer() as t:
            train_rl(fc.rl_config(s, out, {"name": "ppo"}, coef, fc.rm_reward([rm]), train={"seed": args.seed}))
        cps = fc.checkpoints(out)
        for step, path in cps:
            rows.append(
                {"method": "PPO", "setting": f"kl={coef:g}", "step": step, "final": step == cps[-1][0], "train_s": t.s}
                | ev(ev.policy(path))
            )
        print(f"PPO kl {coef}: {t.s:.0f}s gold {rows[-1]['gold']:.3f} kl {rows[-1]['kl']:.2f}", flush=True)
    finals = [r for r in rows if r["final"]]
    text = (
        "# Reward-KL frontier: DPO against PPO (CPU, tiny model)\n\n"
        f"`python bench/dpo_vs_ppo_frontier.py{' --quick' if args.quick else ''}`. The same "
        f"{sum(1 for _ in open(s.pairs_train))} gold-labelled pairs feed DPO (lr 5e-4, 32 pairs per step, "
        f"{args.dpo_steps if not args.quick else scale.po_steps} steps) and PPO's reward model (PPO: lr "
        f"{scale.rl_lr}, {scale.rl_rows} responses per step, {scale.rl_steps} steps). Final policies sampled "
        f"{scale.eval_samples}x on {scale.eval_prompts} held-out prompts.\n\n"
        + verdict(rows)
        + "\n\n"
        + fc.md_table(finals, ["method", "setting", "kl", "gold", "proxy", "response_len", "train_s"])
        + f"\n![plot]({NAME}.png)\n\nEvery evaluated policy (PPO checkpoints included):"
    )
    payload = fc.write_results(NAME, Path(args.out), rows, COLUMNS, text, fc.machine(scale))
    plot(Path(args.out) / f"{NAME}.png", rows)
    print(text)
    return payload


if __name__ == "__main__":
    main()
