"""Run the SFT, reward-model, DPO and online-RL benchmarks against TRL; write ``bench/results/{sft,rm,dpo,rl}.json``
+ ``README.md`` (and ``dpo.md``: pairs/s and memory).

Each bench first times every TRL setting once (``--sweep-steps`` steps each) and keeps the fastest, then
alternates TRL and alignflow ``--repeats`` times (``--steps`` timed steps after 2 warm-up steps) and reports
medians. About 12 minutes on a 2-core machine; each child run stays under 2 minutes. The RL bench
(``bench_rl.py``: GRPO and RLOO, its own defaults for steps and prompts per step) follows with ``--repeats`` runs
and its own TRL sweep; its section is appended to ``README.md``.

    python bench/run_all.py [--steps 10] [--sweep-steps 4] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_dpo  # noqa: E402
import bench_rl  # noqa: E402
import bench_rm  # noqa: E402
import bench_sft  # noqa: E402
import common  # noqa: E402


def bench_args(module, args) -> argparse.Namespace:
    """The bench's own parser defaults, overridden by run_all's options."""
    return common.bench_parser(module.__doc__, module.TRL_MODES, module.ALIGNFLOW_MODES).parse_args(
        [
            "--steps",
            str(args.steps),
            "--sweep-steps",
            str(args.sweep_steps),
            "--repeats",
            str(args.repeats),
            "--threads",
            str(args.threads),
            "--batch",
            str(args.batch),
            "--work",
            args.work,
            "--sweep",
        ]
    )


def table(results: list[dict]) -> str:
    """The markdown report: machine, headline ratios, every TRL setting, settings of both sides."""
    m = results[0]["machine"]
    lines = [
        "# alignflow vs TRL: SFT and reward-model training throughput",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared), torch threads {m['threads']}; python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}; {m['date']}, 1-min load at start "
        f"{m.get('load_average_1m_at_start', float('nan')):.2f}.",
        "",
        "tokens/s = real (non-pad) tokens of the timed steps / wall time (CPU time for the tok/cpu-s column), "
        "median of the alternated runs. Workload and settings: `docs/benchmarks.md`. Regenerate with "
        "`python bench/run_all.py`.",
        "",
        "| bench | alignflow | TRL (fastest setting) | alignflow tok/s | TRL tok/s | ratio (wall) | "
        "alignflow tok/cpu-s | TRL tok/cpu-s | ratio (CPU time) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        a, t = r["alignflow"], r["trl"]
        lines.append(
            f"| {r['bench'].upper()} | {r['alignflow_mode']} | {r['trl_mode']} | "
            f"{a['median_tokens_per_s']:.0f} | {t['median_tokens_per_s']:.0f} | **{r['ratio']:.2f}x** | "
            f"{a['median_tokens_per_cpu_s']:.0f} | {t['median_tokens_per_cpu_s']:.0f} | "
            f"{r['cpu_time_ratio']:.2f}x |"
        )
    for r in results:
        a = r["alignflow"]
        lines += [
            "",
            f"## {r['bench'].upper()}: every TRL setting ({r['trl_sweep_steps']} timed steps each, one run; "
            f"ratio = alignflow median / this run)",
            "",
            "| TRL setting | tok/s | tok/cpu-s | alignflow / TRL (wall) | alignflow / TRL (CPU time) |",
            "|---|---:|---:|---:|---:|",
        ]
        for mode, s in r["trl_sweep"].items():
            lines.append(
                f"| {mode} | {s['median_tokens_per_s']:.0f} | {s['median_tokens_per_cpu_s']:.0f} | "
                f"{a['median_tokens_per_s'] / s['median_tokens_per_s']:.2f}x | "
                f"{a['median_tokens_per_cpu_s'] / s['median_tokens_per_cpu_s']:.2f}x |"
            )
        lines += [
            "",
            f"Settings: alignflow `{json.dumps(a['runs'][0]['settings'])}`; "
            f"TRL `{json.dumps(r['trl']['runs'][0]['settings'])}`.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sweep-steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--work", default=common.common_argparser("").get_default("work"))
    p.add_argument("--results", default=str(HERE / "results"))
    args = p.parse_args()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for module in (bench_sft, bench_rm, bench_dpo):
        res = common.run_bench(module.__file__, module.NAME, module.UNIT, module.TRL_MODES, bench_args(module, args))
        if module is bench_dpo:  # pairs/s and memory medians, and its own report (bench/results/dpo.md)
            res = bench_dpo.summarise(res)
            (out / "dpo.md").write_text(bench_dpo.report(res))
        (out / f"{module.NAME}.json").write_text(json.dumps(res, indent=1))
        results.append(res)
    (out / "README.md").write_text(table(results))
    rl_args = bench_rl.parser().parse_args(
        ["--runs", str(args.repeats), "--threads", str(args.threads), "--work", args.work, "--sweep"]
    )
    bench_rl.write_results(bench_rl.compare(rl_args), out)  # rl.json + the RL section of README.md
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
