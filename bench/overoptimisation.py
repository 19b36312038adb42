"""Reward over-optimisation (Gao et al. 2023, "Scaling Laws for Reward Model Overoptimization") on the reviews task.

PPO optimises a learned proxy reward model (a Bradley-Terry model trained on ~900 gold-labelled pairs of SFT samples,
``findings_common``) with no KL penalty (the paper's RL runs vary the KL by training longer, not by a penalty).
Every ``save_every`` steps the checkpoint is sampled on held-out prompts and scored by the proxy and by the hidden
gold reward; the KL to the SFT policy is measured on the same samples. Gao et al. find the proxy rising steadily
with d = sqrt(KL) while the gold reward first rises, then falls, following R_gold(d) = d (alpha - beta d).
The script fits that form by least squares to the gold gain over the start (y = gold - gold_0, no intercept:
y = alpha d - beta d^2) and reports alpha, beta and the peak d* = alpha / (2 beta).

    python bench/overoptimisation.py              # ~2 min on one CPU thread: writes bench/results/overoptimisation.*
    python bench/overoptimisation.py --quick      # seconds, for the tests
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import findings_common as fc  # noqa: E402

NAME = "overoptimisation"
COLUMNS = ["run", "seed", "step", "sqrt_kl", "kl", "proxy", "gold", "response_len"]


def fit_gao(rows: list[dict]) -> dict:
    """Least-squares fit of y = alpha d - beta d^2 (y = gold - gold at step 0, d = sqrt KL) over ``rows``.

    Minimising sum (alpha d + gamma d^2 - y)^2 with gamma = -beta gives the normal equations
    [a b; b c] [alpha; gamma] = [p; q] with a = sum d^2, b = sum d^3, c = sum d^4, p = sum d y, q = sum d^2 y;
    by Cramer's rule alpha = (p c - q b) / (a c - b^2) and gamma = (a q - b p) / (a c - b^2).
    Check: points on y = 2d - d^2 at d = 1, 2 (y = 1, 0): a = 5, b = 9, c = 17, p = 1, q = 1, det = 4,
    alpha = (17 - 9) / 4 = 2, gamma = (5 - 9) / 4 = -1, so beta = 1 and the peak d* = alpha / (2 beta) = 1.
    """
    g0 = {r["seed"]: r["gold"] for r in rows if r["step"] == 0}
    pts = [(r["sqrt_kl"], r["gold"] - g0[r["seed"]]) for r in rows if r["step"] > 0]
    a = sum(d**2 for d, _ in pts)
    b = sum(d**3 for d, _ in pts)
    c = sum(d**4 for d, _ in pts)
    p = sum(d * y for d, y in pts)
    q = sum(d**2 * y for d, y in pts)
    det = a * c - b * b
    if not pts or det <= 0:
        return {"alpha": float("nan"), "beta": float("nan"), "d_peak": float("nan")}
    alpha, beta = (p * c - q * b) / det, -(a * q - b * p) / det
    return {"alpha": alpha, "beta": beta, "d_peak": alpha / (2 * beta) if beta > 0 else float("inf")}


def plot(path: Path, rows: list[dict], fit: dict) -> None:
    plt = fc.pyplot()
    fig, (ax_g, ax_p) = plt.subplots(1, 2, figsize=(9, 3.4))
    for seed in sorted({r["seed"] for r in rows}):
        rs = [r for r in rows if r["seed"] == seed]
        ax_g.plot([r["sqrt_kl"] for r in rs], [r["gold"] for r in rs], "o-", label=f"gold, seed {seed}")
        ax_p.plot([r["sqrt_kl"] for r in rs], [r["proxy"] for r in rs], "o-", label=f"proxy, seed {seed}")
    if fit["alpha"] == fit["alpha"]:
        g0 = sum(r["gold"] for r in rows if r["step"] == 0) / max(1, len([r for r in rows if r["step"] == 0]))
        top = max(r["sqrt_kl"] for r in rows)
        ds = [top * i / 50 for i in range(51)]
        ax_g.plot(ds, [g0 + d * (fit["alpha"] - fit["beta"] * d) for d in ds], "k--", label="fit d(α - βd)")
    x = "sqrt KL(π || π_sft) (nats^½)"
    ax_g.set(xlabel=x, ylabel="gold reward (held-out samples)", title="gold (never optimised)")
    ax_p.set(xlabel=x, ylabel="proxy RM score", title="proxy (optimised by PPO)")
    for ax in (ax_g, ax_p):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = fc.base_parser(__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="RL seeds (same proxy RM)")
    ap.add_argument("--kl-coef", type=float, default=0.0)
    args, scale, work = fc.parse(ap, argv)
    from alignflow.trainers.rl import train_rl

    s = fc.setup(work, scale)
    rm = fc.train_rm(s, 0)
    ev = fc.Evaluator(s, [rm])
    start = ev(ev.ref)
    rows: list[dict] = []
    for seed in args.seeds if not args.quick else args.seeds[:1]:
        run = work / f"oo-ppo-kl{args.kl_coef}-s{seed}"
        with fc.Timer() as t:
            train_rl(fc.rl_config(s, run, {"name": "ppo"}, args.kl_coef, fc.rm_reward([rm]), train={"seed": seed}))
        rows += [r | {"seed": seed} for r in fc.curve(ev, run, "ppo", start)]
        print(f"seed {seed}: {t.s:.0f}s, gold {rows[-1]['gold']:.3f}, proxy {rows[-1]['proxy']:.3f}", flush=True)
    fit = fit_gao(rows)
    acc = fc.rm_accuracy(s, rm)
    out = Path(args.out)
    best = max(rows, key=lambda r: r["gold"])
    text = (
        f"# Reward over-optimisation: PPO against a learned proxy (CPU, tiny model)\n\n"
        f"`python bench/overoptimisation.py{' --quick' if args.quick else ''}`. Proxy: Bradley-Terry RM, "
        f"held-out accuracy {acc:.3f} on its noisy labels. PPO, KL coefficient {args.kl_coef}, lr {scale.rl_lr}, "
        f"{scale.rl_rows} responses per step, {scale.rl_steps} steps; each checkpoint sampled "
        f"{scale.eval_samples}x on {scale.eval_prompts} held-out prompts.\n\n"
        f"Gold peaks at {best['gold']:.3f} (seed {best['seed']}, step {best['step']}, sqrt KL {best['sqrt_kl']:.2f}) "
        f"from {start['gold']:.3f} at the SFT start; at the last checkpoint gold is "
        + ", ".join(f"{r['gold']:.3f} (seed {r['seed']})" for r in rows if r["step"] == scale.rl_steps)
        + f" while the proxy went from {start['proxy']:.3f} to "
        + ", ".join(f"{r['proxy']:.3f}" for r in rows if r["step"] == scale.rl_steps)
        + f". Fit gold - gold_0 = d (α - β d): α = {fit['alpha']:.3f}, β = {fit['beta']:.3f}, "
        f"peak at d = {fit['d_peak']:.2f}.\n\n![plot]({NAME}.png)"
    )
    payload = fc.write_results(NAME, out, rows, COLUMNS, text, fc.machine(scale) | {"fit": fit, "rm_accuracy": acc})
    plot(out / f"{NAME}.png", rows, fit)
    print(text)
    return payload


if __name__ == "__main__":
    main()
