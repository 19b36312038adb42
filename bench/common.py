"""Shared pieces of the SFT and reward-model benchmarks: the workload, the timing window, the runner.

Workload (identical for alignflow and TRL, read from the same files):

* model: the built-in ``reviews`` task's tiny Llama, sized up to hidden 256, 4 layers, 4 heads, MLP 1024,
  with the task's word-level tokenizer (its vocabulary);
* SFT rows: ``prompt`` (a review opening) + ``completion`` (reviews of the corpus concatenated), each row
  exactly L tokens long with L uniform in [16, 256] (BOS + prompt + completion + EOS);
* preference rows: one prompt, a chosen and a rejected completion, each sequence L ~ U[16, 256] independently.

Both sides train on the SAME token ids: alignflow reads the jsonl files through its own pipeline, TRL gets the
ids that pipeline produced (pre-tokenised columns), so tokenisation differences cannot enter the comparison.

Timing: tokens/s = real (non-pad) tokens of the timed steps / wall time from the END of warm-up step 2 to the
END of the last timed step (data loading, forward, backward, clipping and the optimiser step all included).
The same tokens per second of process CPU time are recorded too: on a shared machine a process that is
descheduled loses wall time but not CPU time, so the CPU-time ratio is the steadier of the two (with one
thread it is the compute time; with more, OpenMP threads that spin-wait inflate it).
Each side runs in its own subprocess (same process tree), sides alternate, medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIN_LEN, MAX_LEN = 16, 256
MODEL_SIZE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024}


# ------------------------------------------------------------------------------------------ workload
def build_task_dir(work: Path):
    """The reviews task (tokenizer, tiny Llama of the benchmark's size, corpus) under ``work/task``."""
    from alignflow.config import TaskConfig
    from alignflow.tasks import build_task

    return build_task("reviews", TaskConfig(num_sft=2000, num_pairs=10, **MODEL_SIZE), work / "task")


def _corpus(task) -> tuple[list[str], list[list[str]]]:
    """(prompts, reviews as token lists) of the task's SFT corpus; reviews are canonical (space-separated)."""
    rows = [json.loads(line) for line in open(task.sft_path)]
    prompts = [r["prompt"] for r in rows]
    reviews = [(r["prompt"].split(":", 1)[1] + r["completion"]).split() for r in rows]
    return prompts, reviews


def _completion(rng: random.Random, reviews: list[list[str]], n_words: int) -> str:
    """A completion of exactly ``n_words`` tokens: whole reviews laid end to end, the last one cut."""
    words: list[str] = []
    while len(words) < n_words:
        words += reviews[rng.randrange(len(reviews))]
    return " " + " ".join(words[:n_words])


def write_rows(task, tokenizer, work: Path, n_sft: int, n_pairs: int, seed: int = 0) -> dict:
    """Write ``sft.jsonl`` and ``pairs.jsonl`` with lengths uniform in [MIN_LEN, MAX_LEN]; returns their paths."""
    prompts, reviews = _corpus(task)
    rng = random.Random(seed)

    def row_text(total: int, prompt: str) -> str:
        n_prompt = len(tokenizer(prompt)["input_ids"])  # BOS + prompt tokens
        return _completion(rng, reviews, max(1, total - n_prompt - 1))  # - EOS

    sft, pairs = [], []
    for _ in range(n_sft):
        p = prompts[rng.randrange(len(prompts))]
        sft.append({"prompt": p, "completion": row_text(rng.randint(MIN_LEN, MAX_LEN), p)})
    for _ in range(n_pairs):
        p = prompts[rng.randrange(len(prompts))]
        c = row_text(rng.randint(MIN_LEN, MAX_LEN), p)
        r = c
        while r == c:
            r = row_text(rng.randint(MIN_LEN, MAX_LEN), p)
        pairs.append({"prompt": p, "chosen": c, "rejected": r})
    paths = {"sft": work / "sft.jsonl", "pairs": work / "pairs.jsonl"}
    for key, rows in (("sft", sft), ("pairs", pairs)):
        with open(paths[key], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return paths


def prepare_workload(work: Path, n_rows: int) -> dict:
    """Build (or reuse) the task and the rows; returns the paths every side reads (a JSON-able dict)."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    task = build_task_dir(work)
    from alignflow.models import load_tokenizer

    tok = load_tokenizer(str(task.tokenizer_dir))
    paths = write_rows(task, tok, work, n_rows, n_rows)
    return {
        "model_dir": str(task.model_dir),
        "tokenizer_dir": str(task.tokenizer_dir),
        "vocab_size": len(tok),
        "sft_path": str(paths["sft"]),
        "pairs_path": str(paths["pairs"]),
    }


def encoded_rows(cfg_cls, data: dict, tokenizer) -> list[dict]:
    """The rows exactly as alignflow's data pipeline tokenises them (the ids TRL is given)."""
    from alignflow.config import from_dict
    from alignflow.data.pipeline import prepare_data

    cfg = from_dict(cfg_cls, {"data": data})
    return prepare_data(cfg.data, tokenizer, seed=0).train


# ------------------------------------------------------------------------------------------ timing
def real_tokens(batch) -> int:
    """Non-pad tokens of a collated TRL batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["position_ids"].numel())  # padding-free: one row of real tokens (no pad_to_multiple_of)


class StepClock:
    """Wall-clock of optimiser steps: ``mark(step_done)`` after each step, ``add_tokens`` per step's batch."""

    def __init__(self, warmup: int, timed: int):
        self.warmup, self.timed = warmup, timed
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.tokens: list[int] = []

    def mark(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def count_batches(self, trainer, accum: int) -> list[int]:
        """Wrap a TRL trainer's ``data_collator``: every ``accum`` collated batches (one optimiser step) add their
        real tokens to ``tokens``. Returns ``[real, computed]`` token totals over all batches, updated as training
        runs (computed = the size of the padded ``input_ids``)."""
        collate, per_step, totals = trainer.data_collator, [], [0, 0]

        def counting(features):
            batch = collate(features)
            per_step.append(real_tokens(batch))
            totals[0], totals[1] = totals[0] + per_step[-1], totals[1] + batch["input_ids"].numel()
            if len(per_step) == accum:
                self.tokens.append(sum(per_step))
                per_step.clear()
            return batch

        trainer.data_collator = counting
        return totals

    def result(self) -> dict:
        w, n = self.warmup, self.timed
        if len(self.ends) < w + n or len(self.tokens) < w + n:
            raise RuntimeError(
                f"only {len(self.ends)} steps timed and {len(self.tokens)} batches counted; need {w + n}"
            )
        seconds = self.ends[w + n - 1] - self.ends[w - 1]
        cpu = self.cpu[w + n - 1] - self.cpu[w - 1]
        tokens = sum(self.tokens[w : w + n])
        return {
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "cpu_seconds": cpu,
            "tokens_per_cpu_s": tokens / cpu,
            "step_s": [b - a for a, b in zip(self.ends[w - 1 : w + n - 1], self.ends[w : w + n], strict=False)],
        }


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)


# ------------------------------------------------------------------------------------------ runner
def run_side(script: Path, side: str, mode: str, args, work: Path, tag: str) -> dict:
    """Run one side in a subprocess (``script --side ... --out ...``) and read its JSON result."""
    out = work / f"{tag}.json"
    cmd = [
        sys.executable,
        str(script),
        "--side",
        side,
        "--mode",
        mode,
        "--work",
        str(work),
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side}/{mode} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    print(
        f"  {side:9s} {mode:16s} {res['tokens_per_s']:7.0f} tok/s {res['tokens_per_cpu_s']:7.0f} tok/cpu-s "
        f"({res['tokens']} tokens in "
        f"{res['seconds']:.1f} s, process {res['wall_s']:.0f} s)  load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    return res


def load_average() -> float:
    return os.getloadavg()[0]


def machine_info(threads: int) -> dict:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "load_average_1m_at_start": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def median_of(runs: list[dict], key: str = "tokens_per_s") -> float:
    return statistics.median(r[key] for r in runs)


def alternate(script: Path, args, work: Path, sides: list[tuple[str, str]], repeats: int) -> dict:
    """Run every (side, mode) ``repeats`` times, interleaved (a, b, a, b, ...); returns runs per key."""
    runs: dict[str, list[dict]] = {f"{s}/{m}": [] for s, m in sides}
    for r in range(repeats):
        for side, mode in sides:
            runs[f"{side}/{mode}"].append(run_side(script, side, mode, args, work, f"{side}-{mode}-{r}"))
    return runs


def common_argparser(description: str):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--side", choices=("main", "alignflow", "trl"), default="main")
    p.add_argument("--mode", default="", help="side's setting (alignflow: packed|padded; TRL: see TRL_MODES)")
    p.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "alignflow-bench"),
        help="scratch directory (task, rows, run outputs); outside the repository",
    )
    p.add_argument("--out", default="")
    p.add_argument("--steps", type=int, default=10, help="timed optimiser steps")
    p.add_argument("--sweep-steps", type=int, default=4, help="timed steps of each TRL mode in the sweep")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--batch", type=int, default=32, help="rows (pairs) per optimiser step")
    p.add_argument("--repeats", type=int, default=2, help="alternations of the two sides")
    p.add_argument("--sweep", action="store_true", help="time every TRL mode once first and keep the fastest")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    return p


def summary(runs: list[dict]) -> dict:
    return {
        "median_tokens_per_s": median_of(runs),
        "median_tokens_per_cpu_s": median_of(runs, "tokens_per_cpu_s"),
        "runs": runs,
    }


def compare(script: Path, args, work: Path, name: str, trl_modes: tuple, unit: str) -> dict:
    """The whole comparison: optional sweep of TRL's modes, then TRL and alignflow alternated ``args.repeats``
    times; prints the ratio and returns the result record (JSON-able)."""
    machine = machine_info(args.threads)
    print(
        f"{name} bench: {args.batch} {unit}/step, {args.warmup} warm-up + {args.steps} timed steps, "
        f"{args.threads} thread(s), load {load_average():.2f}",
        flush=True,
    )
    sweep, trl_mode = {}, args.trl_mode
    if args.sweep:
        quick = argparse.Namespace(**{**vars(args), "steps": args.sweep_steps})
        sweep = alternate(script, quick, work, [("trl", m) for m in trl_modes], 1)
        trl_mode = max(trl_modes, key=lambda m: median_of(sweep[f"trl/{m}"]))
        print(f"  fastest TRL mode: {trl_mode}", flush=True)
    runs = alternate(script, args, work, [("trl", trl_mode), ("alignflow", args.alignflow_mode)], args.repeats)
    af, tr = summary(runs[f"alignflow/{args.alignflow_mode}"]), summary(runs[f"trl/{trl_mode}"])
    ratio = af["median_tokens_per_s"] / tr["median_tokens_per_s"]
    cpu_ratio = af["median_tokens_per_cpu_s"] / tr["median_tokens_per_cpu_s"]
    print(
        f"{name} alignflow/TRL = {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time  (alignflow[{args.alignflow_mode}] "
        f"{af['median_tokens_per_s']:.0f} tok/s, TRL[{trl_mode}] {tr['median_tokens_per_s']:.0f} tok/s)",
        flush=True,
    )
    return {
        "bench": name.lower(),
        "machine": machine,
        "steps": args.steps,
        "warmup": args.warmup,
        f"{unit}_per_step": args.batch,
        "ratio": ratio,
        "cpu_time_ratio": cpu_ratio,
        "trl_mode": trl_mode,
        "alignflow_mode": args.alignflow_mode,
        "alignflow": af,
        "trl": tr,
        "trl_sweep_steps": args.sweep_steps if sweep else 0,
        "trl_sweep": {k.split("/", 1)[1]: summary(v) for k, v in sweep.items()},
    }


def bench_parser(doc: str, trl_modes: tuple, alignflow_modes: tuple) -> argparse.ArgumentParser:
    """The options both benches take: the shared ones plus the two sides' modes."""
    p = common_argparser(doc.splitlines()[0])
    p.add_argument("--trl-mode", default="padded", choices=trl_modes, help="TRL mode when not sweeping")
    p.add_argument("--alignflow-mode", default="packed", choices=alignflow_modes)
    return p


def run_bench(script: str, name: str, unit: str, trl_modes: tuple, args) -> dict:
    """Build the workload, optionally sweep TRL's modes, alternate the two sides; return the result record."""
    work = Path(args.work)
    wl = prepare_workload(work, args.batch * (args.warmup + args.steps))  # one epoch: each row once
    (work / "workload.json").write_text(json.dumps(wl))
    return compare(Path(script).resolve(), args, work, name.upper(), trl_modes, unit)


def bench_main(module) -> None:
    """A bench's command line. ``--side main`` runs the comparison and writes ``<results>/<NAME>.json``;
    ``--side alignflow|trl`` is one timed child run writing ``--out``. ``module`` is the bench module
    (``NAME``, ``UNIT``, ``TRL_MODES``, ``ALIGNFLOW_MODES``, ``alignflow_side``, ``trl_side``)."""
    args = bench_parser(module.__doc__, module.TRL_MODES, module.ALIGNFLOW_MODES).parse_args()
    if args.side != "main":
        set_threads(args.threads)
        wl = json.loads((Path(args.work) / "workload.json").read_text())
        side = module.alignflow_side if args.side == "alignflow" else module.trl_side
        Path(args.out).write_text(json.dumps(side(args, wl, args.mode)))
        return
    result = run_bench(module.__file__, module.NAME, module.UNIT, module.TRL_MODES, args)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / f"{module.NAME}.json").write_text(json.dumps(result, indent=1))
