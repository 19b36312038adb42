"""Preference-as-reward (PAR) against reward hacking (Fu et al. 2025, "Reward Shaping to Mitigate Reward Hacking in
RLHF") on the reviews task.

The setting of ``bench/overoptimisation.py``: PPO with no KL penalty optimises one Bradley-Terry reward model
trained on a few hundred noisy gold labels, and every checkpoint is sampled on held-out prompts to read the gold
reward, the proxy's score and the KL to the SFT policy. Two runs per RL seed, differing only in the reward:

* ``plain``: R = r(x, y), the proxy's raw score (the over-optimisation bench's run);
* ``par``:   R = (1/M) sum_m sigmoid(r(x, y) - r(x, y_ref_m)), with M reference answers per prompt sampled from
  the SFT policy (``reward.shaping=par``, ``reward.reference_samples=M``).

The paper's finding: the raw reward climbs while the gold reward collapses; PAR, bounded in (0, 1) and flat far
above the reference, stops paying for the proxy's runaway scores, so the gold reward holds up longer. The ``proxy``
column is the raw proxy score of the samples in both runs (not the shaped reward), so the two runs' proxy climbs
are comparable. ``gold@d`` interpolates the gold reward at sqrt KL = d (``rm_ensembles.gold_at``).

    python bench/par_hacking.py --seeds 0 1   # ~10 min on one CPU thread: writes bench/results/par_hacking.*
    python bench/par_hacking.py --quick       # seconds, for the tests
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import findings_common as fc  # noqa: E402
import rm_ensembles as ens  # noqa: E402

NAME = "par_hacking"
COLUMNS = ["run", "seed", "step", "sqrt_kl", "kl", "proxy", "gold", "response_len"]


def reward(rm: Path, run: str, references: int) -> dict:
    """The reward section of one run: the proxy alone, or the proxy shaped by PAR against ``references`` answers."""
    shaping = {"shaping": "par", "reference_samples": references} if run == "par" else {}
    return fc.rm_reward([rm], "mean", **shaping)


def main(argv=None) -> dict:
    ap = fc.base_parser(__doc__)
    ap.add_argument("--references", type=int, default=1, help="M reference answers per prompt for PAR")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="RL seeds (default: --seed)")
    args, scale, work = fc.parse(ap, argv)
    from alignflow.trainers.rl import train_rl

    s = fc.setup(work, scale)
    rm = fc.train_rm(s, 0)
    acc = fc.rm_accuracy(s, rm)
    ev = fc.Evaluator(s, [rm])
    start = ev(ev.ref)
    rows: list[dict] = []
    seeds = args.seeds or [args.seed]
    for seed in seeds:
        for run in ("plain", "par"):
            out_dir = work / f"par-{run}-m{args.references}-s{seed}"
            cfg = fc.rl_config(s, out_dir, {"name": "ppo"}, 0.0, reward(rm, run, args.references), train={"seed": seed})
            with fc.Timer() as t:
                train_rl(cfg)
            rows += [r | {"seed": seed} for r in fc.curve(ev, out_dir, run, start)]
            print(f"{run} s{seed}: {t.s:.0f}s, gold {rows[-1]['gold']:.3f}, sqrt KL {rows[-1]['sqrt_kl']:.2f}")
    summary = ens.summarise(rows)
    seed_arg = f" --seeds {' '.join(map(str, seeds))}" if args.seeds else ""
    out = Path(args.out)
    text = (
        f"# PAR against reward hacking (CPU, tiny model)\n\n"
        f"`python bench/par_hacking.py{' --quick' if args.quick else ''}{seed_arg}`. One Bradley-Terry proxy "
        f"(held-out accuracy {acc:.3f}); PPO, no KL penalty, lr {scale.rl_lr}, {scale.rl_rows} responses per step, "
        f"{scale.rl_steps} steps, RL seed(s) {', '.join(map(str, seeds))}; PAR with M = {args.references} "
        f"reference answer(s) per prompt; checkpoints every {scale.save_every} steps sampled {scale.eval_samples}x "
        f"on {scale.eval_prompts} held-out prompts. `proxy` is the raw proxy score in both runs.\n\n"
        + fc.md_table(summary, ens.SUMMARY)
        + f"\n![plot]({NAME}.png)\n\nEvery checkpoint:"
    )
    meta = fc.machine(scale) | {"references": args.references, "rm_accuracy": acc, "summary": summary}
    payload = fc.write_results(NAME, out, rows, COLUMNS, text, meta)
    ens.plot(out / f"{NAME}.png", rows)
    print(text)
    return payload


if __name__ == "__main__":
    main()
