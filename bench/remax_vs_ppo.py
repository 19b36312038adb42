"""ReMax against PPO at matched reward: wall time and memory (Li et al. 2023, "ReMax: A Simple, Effective, and
Efficient Reinforcement Learning Method for Aligning Large Language Models").

Both optimise the same learned reward model (``findings_common``: the Bradley-Terry proxy of the reviews task) from
the same SFT policy, KL coefficient 0.05 in the reward, lr and rows per step as in the other finding benches, each
in its own child process (so memory is per method):

* PPO: one sample per prompt, a critic initialised from the reward model, GAE, 2 epochs of 2 mini-batches;
* ReMax: one sample and one greedy response per prompt, REINFORCE with the greedy reward as baseline, no critic,
  one update per batch.

Measured per run:

* ``train_s``: wall time of ``train_rl``; ``s_to_target`` / ``steps_to_target``: the summed step time (the
  trainer's ``perf/step_s``) and steps until the 5-step moving average of the training reward (the reward model's
  score on the step's samples, ``rollout/reward_mean``) first reaches the target. Target = the lower of the two
  runs' best moving averages, so both reach it: that is the matched reward.
* ``rss_growth_mb``: peak RSS sampled every 5 ms during training minus the RSS when training starts (activations,
  gradients, optimiser state; ``bench_dpo.RSSPeak``), ``peak_rss_mb``: the process's peak RSS (interpreter and
  libraries included).
* ``state_mb``: what the run keeps between steps, counted over every live ``nn.Module`` and optimiser after
  training: parameters and buffers of all models (actor, reference, reward model, critic) + gradients + optimiser
  state, each tensor once. The paper's memory saving (~46% on 7B models) is this term: ReMax drops the critic, its
  gradients and its Adam moments. On this tiny model the process's RSS is dominated by the interpreter and the
  activations, so ``state_mb`` is the figure that scales.
* ``gold`` / ``proxy`` / ``kl``: the final policy sampled on held-out prompts, as in the other finding benches.

    python bench/remax_vs_ppo.py            # ~3 min on one CPU thread: writes bench/results/remax_vs_ppo.*
    python bench/remax_vs_ppo.py --quick    # seconds, in one process, for the tests
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import findings_common as fc  # noqa: E402

NAME = "remax_vs_ppo"
COLUMNS = [
    "algo",
    "steps",
    "train_s",
    "s_per_step",
    "steps_to_target",
    "s_to_target",
    "target",
    "rss_growth_mb",
    "peak_rss_mb",
    "state_mb",
    "gold",
    "proxy",
    "kl",
]
WINDOW = 5


def state_bytes() -> dict:
    """Bytes of every live model's parameters and buffers, their gradients and every optimiser's state, each
    storage counted once (found through the garbage collector, so no role is missed)."""
    import torch

    seen: set = set()
    out = {"params": 0, "grads": 0, "optim": 0}

    def add(key: str, t) -> None:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            out[key] += t.untyped_storage().nbytes()

    with warnings.catch_warnings():  # isinstance on some lazy torch module objects warns of deprecated names
        warnings.simplefilter("ignore")
        objs = [o for o in gc.get_objects() if isinstance(o, (torch.nn.Module, torch.optim.Optimizer))]
    for obj in objs:
        if isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters(recurse=False)) + list(obj.buffers(recurse=False)):
                add("params", t)
                add("grads", t.grad)
        elif isinstance(obj, torch.optim.Optimizer):
            for st in obj.state.values():
                for t in st.values():
                    add("optim", t)
    return out


def moving(xs: list[float], w: int = WINDOW) -> list[float]:
    """Trailing moving average: m_i = mean(xs[max(0, i - w + 1) .. i]); e.g. w = 2, [1, 3, 5] -> [1, 2, 4]."""
    return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def to_target(history: list[dict], target: float) -> tuple[int, float]:
    """(steps, summed perf/step_s) until the moving training reward first reaches ``target``; (-1, nan) if never."""
    avg = moving([m.get("rollout/reward_mean", float("nan")) for m in history])
    for i, a in enumerate(avg):
        if a >= target:
            return i + 1, sum(m.get("perf/step_s", 0.0) for m in history[: i + 1])
    return -1, float("nan")


def config(s: fc.Setup, work: Path, algo: str, seed: int, rm: Path, minibatches: int = 1):
    """PPO: 2 epochs x 2 mini-batches; ReMax: ``minibatches`` updates on each batch (its paper: 1)."""
    rollout = {"n": 1, "prompts_per_step": s.scale.rl_rows}  # one sample per prompt for both (ReMax adds a greedy one)
    train = {"seed": seed}
    if algo == "remax":
        train["batch_size"] = max(1, s.scale.rl_rows // minibatches)
    out = work / f"remax-vs-{algo}-mb{minibatches if algo == 'remax' else 2}-s{seed}"
    return fc.rl_config(s, out, {"name": algo}, 0.05, fc.rm_reward([rm]), train=train, rollout=rollout)


def child(args, scale, work: Path) -> dict:
    """One method's run in this process: set up (cached), train with the RSS sampler on, measure, evaluate."""
    from bench_dpo import RSSPeak

    from alignflow.trainers.rl import train_rl

    s = fc.setup(work, scale)
    rm = fc.train_rm(s, 0)
    cfg = config(s, work, args.child, args.seed, rm, args.remax_minibatches)
    gc.collect()
    mem = RSSPeak()
    mem.start()
    with fc.Timer() as t:
        res = train_rl(cfg)
    rss = mem.result()
    states = state_bytes()
    hist = [{k: v for k, v in m.items() if isinstance(v, (int, float))} for m in res.history]
    del res
    gc.collect()
    ev = fc.Evaluator(s, [rm])
    final = ev(ev.policy(Path(cfg.train.output_dir) / "model"))
    return {
        "algo": args.child,
        "steps": len(hist),
        "train_s": t.s,
        "s_per_step": t.s / max(1, len(hist)),
        "rss_growth_mb": rss["train_rss_mb"],
        "peak_rss_mb": rss["peak_rss_mb"],
        "state_mb": sum(states.values()) / 2**20,
        "state_bytes": states,
        "history": hist,
        **{k: final[k] for k in ("gold", "proxy", "kl")},
    }


def run_child(args, algo: str, work: Path) -> dict:
    if args.quick:  # one process for the test: the memory figures then overlap and mean nothing
        args.child = algo
        return child(args, fc.QUICK, work)
    result = work / f"remax-vs-{algo}.json"
    cmd = [sys.executable, __file__, "--child", algo, "--work", str(work), "--seed", str(args.seed)]
    cmd += ["--remax-minibatches", str(args.remax_minibatches), "--result"]
    subprocess.run(cmd + [str(result)], check=True)
    return json.loads(result.read_text())


def plot(path: Path, runs: list[dict], target: float) -> None:
    plt = fc.pyplot()
    fig, (ax_r, ax_m) = plt.subplots(1, 2, figsize=(9, 3.4))
    for r in runs:
        t, ts = 0.0, []
        for m in r["history"]:
            t += m.get("perf/step_s", 0.0)
            ts.append(t)
        ax_r.plot(ts, moving([m.get("rollout/reward_mean", float("nan")) for m in r["history"]]), label=r["algo"])
    ax_r.axhline(target, color="grey", ls="--", lw=1, label="matched reward")
    ax_r.set(xlabel="training time (s)", ylabel=f"RM reward ({WINDOW}-step mean)", title="reward against time")
    ax_r.legend(fontsize=8)
    names = [r["algo"] for r in runs]
    xs = range(len(runs))
    ax_m.bar([x - 0.2 for x in xs], [r["state_mb"] for r in runs], 0.4, label="model states (MB)")
    ax_m.bar([x + 0.2 for x in xs], [r["rss_growth_mb"] for r in runs], 0.4, label="RSS growth in training (MB)")
    ax_m.set_xticks(list(xs), names)
    ax_m.set(title="memory")
    ax_m.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = fc.base_parser(__doc__)
    ap.add_argument("--child", default="", help="internal: run one method in this process and write --result")
    ap.add_argument("--result", default="", help="internal: the child's JSON output")
    ap.add_argument("--remax-minibatches", type=int, default=1, help="ReMax updates per batch (PPO makes 4)")
    args, scale, work = fc.parse(ap, argv)
    if args.child:
        Path(args.result).write_text(json.dumps(child(args, scale, work)))
        return {}
    fc.setup(work, scale)  # built once here, not in both children at the same time
    runs = [run_child(args, algo, work) for algo in ("ppo", "remax")]
    target = min(max(moving([m.get("rollout/reward_mean", float("-inf")) for m in r["history"]])) for r in runs)
    rows = []
    for r in runs:
        steps, secs = to_target(r["history"], target)
        rows.append({k: r[k] for k in COLUMNS if k in r} | {"steps_to_target": steps, "s_to_target": secs})
        rows[-1]["target"] = target
    ppo, remax = rows
    ratio = {k: remax[k] / ppo[k] if ppo[k] else float("nan") for k in ("s_to_target", "state_mb", "rss_growth_mb")}
    where = "one process (--quick)" if args.quick else "each method in its own process"
    text = (
        "# ReMax against PPO at matched reward (CPU, tiny model)\n\n"
        f"`python bench/remax_vs_ppo.py{' --quick' if args.quick else ''}`. Same reward model, SFT start, KL "
        f"coefficient 0.05, lr {scale.rl_lr}, {scale.rl_rows} prompts x 1 sample per step, {scale.rl_steps} steps "
        f"(PPO: 2 epochs x 2 mini-batches per batch; ReMax: {args.remax_minibatches} update(s) per batch), "
        f"{where}, 1 torch thread. Matched reward: {target:.3f} (training reward, "
        f"{WINDOW}-step mean).\n\n"
        f"ReMax / PPO: time to the matched reward {ratio['s_to_target']:.2f}x, model-state memory "
        f"{ratio['state_mb']:.2f}x, RSS growth during training {ratio['rss_growth_mb']:.2f}x.\n\n"
        f"![plot]({NAME}.png)"
    )
    meta = fc.machine(scale) | {
        "ratios_remax_over_ppo": ratio,
        "state_bytes": {r["algo"]: r["state_bytes"] for r in runs},
    }
    payload = fc.write_results(NAME, Path(args.out), rows, COLUMNS, text, meta)
    plot(Path(args.out) / f"{NAME}.png", runs, target)
    print(text)
    return payload


if __name__ == "__main__":
    main()
