"""One-command GPU benchmark: alignflow and TRL side by side on one GPU, four workloads, one report.

    python bench/bench_gpu.py                       # one H100/H200: ~6 min -> bench/results/gpu.md and gpu.json
    python bench/bench_gpu.py --only grpo,gen       # a subset
    python bench/bench_gpu.py --smoke --out /tmp/g  # the same code on CPU, tiny shape, < 1 min

Model: ``bench/bench_scale.py``'s workload: the Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 / 2 heads, MLP
4864, vocabulary 151,936, tied embeddings) with random weights, saved once with its word-level tokenizer; every
child loads that same directory. bf16 weights on both sides (pure bf16 training, AdamW), sdpa attention, no
gradient checkpointing, no vLLM for training or rollout. ``--smoke``: bench_scale's TINY shape on CPU in fp32,
smaller batches and one or two timed steps.

Workloads (each side in its own child process, so peaks are separate and a crash is reported, not fatal; one
warm-up step or call first, then the timed ones):

* ``grpo``: one GRPO step, 32 prompts (32-128 words) x 8 samples, <= 256 new tokens, temperature 1, beta 0.04
  (k3 estimator as a loss term), lr 1e-6, one optimiser step per generation batch, bench_scale's
  distinct-word rule reward. alignflow ``train_rl`` (built-in engine) vs TRL ``GRPOTrainer`` at per-device 64
  x gradient accumulation 4 (= the 256-completion batch, one optimiser step), ``loss_type="grpo"``, prompts in
  alignflow's order, ``cache_implementation="static"`` (``--trl-cache``: static, dynamic or paged; bench_rl.py
  found static TRL's fastest generation setting on CPU). Reported: completions/s, step time, generation share
  (generation seconds / step seconds), update seconds (alignflow: its ``online.update``; TRL: step time minus
  ``_generate_and_score_completions``, i.e. forward, backward and optimiser step on both) and update-phase MFU.
* ``gen``: generation alone, the first 32 prompts x 8 samples (batch 256), 256 new tokens, temperature 1, no
  top-k / top-p: ``HFEngine.generate`` vs transformers ``model.generate`` (``num_return_sequences=8``, default
  cache), and vLLM ``LLM.generate`` when vLLM is importable (otherwise a note). tokens/s counts the tokens
  really generated (up to and including EOS; a random model almost never emits it, so ~256 per row).
* ``sft``: 32 prompt + completion rows per step, 128-512 tokens each (uniform), completion-only loss, lr 1e-5.
  alignflow ``train_sft`` (its packing) vs TRL ``SFTTrainer`` on the same token ids (alignflow's pipeline),
  the whole batch in one padded micro-batch. tokens/s = real tokens of the timed steps / their wall time.
* ``dpo``: 16 pairs per step, a 64-128-word prompt and two 128-256-word completions, sigmoid loss, beta 0.1,
  reference log-probs computed once before the timed steps on BOTH sides (alignflow always does;
  TRL ``precompute_ref_log_probs=True``). pairs/s over the timed steps.

MFU (model FLOPs utilisation) uses the 6N-per-token rule with N = bench_scale's ``params_without_embedding``
(LM head included, attention FLOPs not counted)::

    MFU = 6 N T / (seconds x peak)

GRPO update phase: T = prompt + response tokens of the timed batches, seconds = their update seconds (so the
reference forward is not counted, nor its time); SFT / DPO: T = real tokens trained (DPO: chosen + rejected
sequences), seconds = the timed window. Peak: ``--peak-tflops`` (989, dense bf16 of an H100/H200 SXM).
Peak memory: ``torch.cuda.max_memory_allocated`` of each child (model, optimiser, activations; CPU: peak RSS).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() must not initialise CUDA pre-fork
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

WORKLOADS = ("grpo", "gen", "sft", "dpo")
SIDE_ORDER = {
    "grpo": ("trl", "alignflow"),
    "gen": ("generate", "alignflow", "vllm"),
    "sft": ("trl", "alignflow"),
    "dpo": ("trl", "alignflow"),
}
BASELINE = {"grpo": "trl", "gen": "generate", "sft": "trl", "dpo": "trl"}
HEADLINE = {
    "grpo": ("completions_per_s", "completions/s"),
    "gen": ("tokens_per_s", "tokens/s"),
    "sft": ("tokens_per_s", "tokens/s"),
    "dpo": ("units_per_s", "pairs/s"),
}
TARGET = {"grpo": 2.0, "gen": 5.0, "sft": 1.5, "dpo": 1.5}
SIZES = {
    "full": {
        "grpo": {"prompts": 32, "n": 8, "new_tokens": 256, "beta": 0.04, "lr": 1e-6, "warmup": 1, "steps": 2},
        "gen": {"prompts": 32, "n": 8, "new_tokens": 256, "runs": 2},
        "sft": {"batch": 32, "length": (128, 512), "prompt": (16, 64), "max_len": 1024, "warmup": 2, "steps": 5},
        "dpo": {"batch": 16, "prompt": (64, 128), "response": (128, 256), "max_len": 1024, "warmup": 1, "steps": 4},
    },
    "smoke": {
        "grpo": {"prompts": 4, "n": 4, "new_tokens": 16, "beta": 0.04, "lr": 1e-6, "warmup": 1, "steps": 1},
        "gen": {"prompts": 4, "n": 4, "new_tokens": 16, "runs": 1},
        "sft": {"batch": 8, "length": (16, 64), "prompt": (4, 12), "max_len": 128, "warmup": 1, "steps": 2},
        "dpo": {"batch": 4, "prompt": (8, 16), "response": (8, 32), "max_len": 128, "warmup": 1, "steps": 2},
    },
}


# ------------------------------------------------------------------------------------------ workload files
def words(rng: random.Random, vocab: int, lo: int, hi: int) -> str:
    import bench_scale

    return " ".join(bench_scale.word(rng.randrange(vocab // 2)) for _ in range(rng.randint(lo, hi)))


def write_data(work: Path, sizes: dict, vocab: int, seed: int = 0) -> dict:
    """Prompts (bench_scale's), SFT rows and DPO pairs as JSONL under ``work``; returns their paths."""
    import bench_scale

    g, s, d = sizes["grpo"], sizes["sft"], sizes["dpo"]
    n_prompts = max(g["prompts"] * (g["warmup"] + g["steps"]), sizes["gen"]["prompts"])
    paths = {
        "prompts_path": str(bench_scale.write_prompts(work, vocab, n_prompts, seed)),
        "sft_path": str(work / "sft.jsonl"),
        "pairs_path": str(work / "pairs.jsonl"),
    }
    rng = random.Random(seed + 1)
    with open(paths["sft_path"], "w") as f:
        for _ in range(s["batch"] * (s["warmup"] + s["steps"])):
            total, n_prompt = rng.randint(*s["length"]), rng.randint(*s["prompt"])
            f.write(
                json.dumps(
                    {
                        "prompt": words(rng, vocab, n_prompt, n_prompt),
                        "completion": " " + words(rng, vocab, total - n_prompt - 2, total - n_prompt - 2),
                    }
                )
                + "\n"
            )  # BOS + prompt + completion + EOS = total tokens
    with open(paths["pairs_path"], "w") as f:
        for _ in range(d["batch"] * (d["warmup"] + d["steps"])):
            f.write(
                json.dumps(
                    {
                        "prompt": words(rng, vocab, *d["prompt"]),
                        "chosen": " " + words(rng, vocab, *d["response"]),
                        "rejected": " " + words(rng, vocab, *d["response"]),
                    }
                )
                + "\n"
            )
    return paths


def build(job: dict) -> dict:
    """The child that builds the model (on the GPU when there is one: faster) and the data; reports the machine."""
    import bench_scale
    import torch
    import transformers

    work = Path(job["work"])
    shape = bench_scale.TINY if job["smoke"] else bench_scale.QWEN2_05B
    with torch.device(job["device"]):
        model_dir = bench_scale.build_model(work, shape)
    try:
        import trl

        trl_version = trl.__version__
    except ImportError as err:
        trl_version = f"not importable ({err})"
    device = torch.cuda.get_device_name(0) if job["device"] == "cuda" else platform.processor() or "cpu"
    return {
        "model_dir": str(model_dir),
        "n_params": bench_scale.params_without_embedding(model_dir),
        "device_name": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "python": platform.python_version(),
        **write_data(work, SIZES["smoke" if job["smoke"] else "full"], shape["vocab_size"]),
    }


# ------------------------------------------------------------------------------------------ child processes
def child_main(job_path: str) -> None:
    """Run one job (its JSON file) and write its result, or the error, next to it; output goes to its log."""
    job = json.loads(Path(job_path).read_text())
    out, log = Path(job["out"]), open(job["log"], "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    code = 0
    try:
        import torch

        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        if job["side"] == "build":
            res = build(job)
        else:
            import gpu_sides

            res = gpu_sides.side(job["workload"], job["side"])(job)
    except BaseException as err:  # noqa: BLE001 -- reported in the results, never fatal to the driver
        traceback.print_exc()
        res, code = {"error": f"{type(err).__name__}: {err}"[:2000]}, 1
    out.write_text(json.dumps(res))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def preload() -> str:
    """Import the heavy modules once in the driver (each forked child inherits them); the driver never touches
    CUDA, so children can. Returns the start method: "fork", or "spawn" when CUDA got initialised anyway."""
    import gpu_gen  # noqa: F401
    import gpu_sides  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from alignflow.rollout import HFEngine  # noqa: F401
    from alignflow.trainers import rl as online  # noqa: F401

    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
        from trl import DPOTrainer, GRPOTrainer, SFTTrainer  # noqa: F401
    except Exception:  # noqa: BLE001 -- not installed or broken: the TRL children report it
        pass
    return "spawn" if torch.cuda.is_initialized() else "fork"


def run_job(job: dict, timeout: float, method: str) -> dict:
    """Run ``job`` in a child process with a time limit; its result, or ``{"error": ...}`` with the log tail."""
    work = Path(job["work"])
    tag = f"{job['workload']}-{job['side']}"
    job = job | {"out": str(work / f"{tag}.json"), "log": str(work / f"{tag}.log")}
    job_path = work / f"{tag}.job.json"
    job_path.write_text(json.dumps(job))
    Path(job["out"]).unlink(missing_ok=True)
    t0 = time.perf_counter()
    if method == "fork":
        proc = multiprocessing.get_context("fork").Process(target=child_main, args=(str(job_path),))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
        code = proc.exitcode
    else:
        try:
            code = subprocess.run([sys.executable, __file__, "--child", str(job_path)], timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    wall = time.perf_counter() - t0
    out = Path(job["out"])
    if out.exists():
        res = json.loads(out.read_text())
    else:
        why = f"timed out after {timeout:.0f} s" if wall >= timeout else f"died with exit code {code}"
        res = {"error": f"{tag} {why}"}
    if "error" in res:
        tail = Path(job["log"]).read_text()[-3000:] if Path(job["log"]).exists() else ""
        res["log_tail"] = tail
        print(f"  {tag}: FAILED: {res['error']}\n{tail}", flush=True)
    return res | {"process_s": wall}


# ------------------------------------------------------------------------------------------ driver
def summarise(results: dict) -> dict:
    """Per workload: the headline rate of each side and alignflow / baseline (and alignflow / vLLM)."""
    out = {}
    for w, sides in results.items():
        key, unit = HEADLINE[w]
        base, af = sides.get(BASELINE[w], {}), sides.get("alignflow", {})
        rec = {
            "unit": unit,
            "metric": key,
            "baseline": BASELINE[w],
            "target": TARGET[w],
            "sides": sides,
            "ratio": af[key] / base[key] if key in af and key in base else None,
        }
        vllm = sides.get("vllm", {})
        if key in vllm and key in af:
            rec["ratio_vs_vllm"] = af[key] / vllm[key]
        out[w] = rec
    return out


def fmt(x, spec: str = ".1f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def side_cell(res: dict, key: str, spec: str) -> str:
    if "skipped" in res:
        return "skipped"
    if "error" in res:
        return "FAILED"
    return fmt(res.get(key), spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    where = "CPU smoke run (tiny shape; the numbers mean nothing)" if report["smoke"] else m["device_name"]
    lines = [
        f"# alignflow vs TRL on one GPU: {where}",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, TRL {m['trl']}, Python {m['python']}; "
        f"{report['date']}; model {report['model']}; peak {report['peak_tflops']:g} TFLOP/s for MFU; "
        f"whole run {report['wall_s']:.0f} s. Workloads, settings and formulas: the docstring of "
        "`bench/bench_gpu.py` and `docs/benchmarks.md`. Regenerate with `python bench/bench_gpu.py`.",
        "",
        "| workload | unit | alignflow | baseline | baseline rate | ratio | target | MFU alignflow / baseline "
        "| generation share alignflow / baseline | peak memory MB alignflow / baseline |",
        "|---|---|---:|---|---:|---:|---:|---|---|---|",
    ]
    for w, r in report["workloads"].items():
        af, base = r["sides"].get("alignflow", {}), r["sides"].get(r["baseline"], {})
        mfu_key = "update_mfu" if w == "grpo" else "mfu"
        ratio = f"**{r['ratio']:.2f}x**" if r["ratio"] is not None else "n/a"
        lines.append(
            f"| {w} | {r['unit']} | {side_cell(af, r['metric'], '.1f')} | {r['baseline']} | "
            f"{side_cell(base, r['metric'], '.1f')} | {ratio} | >= {r['target']:g}x | "
            f"{side_cell(af, mfu_key, '.1%')} / {side_cell(base, mfu_key, '.1%')} | "
            f"{side_cell(af, 'gen_share', '.0%')} / {side_cell(base, 'gen_share', '.0%')} | "
            f"{side_cell(af, 'peak_mem_mb', '.0f')} / {side_cell(base, 'peak_mem_mb', '.0f')} |"
        )
    return "\n".join(lines + details(report)) + "\n"


def details(report: dict) -> list[str]:
    """The GRPO step breakdown, the vLLM line, seconds per child, each side's settings or failure."""
    lines: list[str] = []
    grpo = report["workloads"].get("grpo")
    if grpo:
        lines += [
            "",
            "| GRPO side | step s (mean) | generation s | update s | prompt + response tokens |",
            "|---|---:|---:|---:|---:|",
        ]
        for side in ("alignflow", "trl"):
            s = grpo["sides"].get(side, {})
            lines.append(
                f"| {side} | {side_cell(s, 'step_s_mean', '.2f')} | {side_cell(s, 'gen_seconds', '.2f')} | "
                f"{side_cell(s, 'update_s', '.2f')} | {side_cell(s, 'train_tokens', '.0f')} |"
            )
    gen = report["workloads"].get("gen")
    if gen:
        v = gen["sides"].get("vllm", {"skipped": "not run (--smoke)"})
        lines += [
            "",
            "vLLM (generation): "
            + (
                v.get("skipped")
                or v.get("error")
                or f"{v['tokens_per_s']:.0f} tokens/s; alignflow / vLLM {fmt(gen.get('ratio_vs_vllm'), '.2f')}x"
            ),
        ]
    took = [
        f"{w}/{side} {res['process_s']:.0f}"
        for w, r in report["workloads"].items()
        for side, res in r["sides"].items()
        if "process_s" in res
    ]
    lines += ["", "Seconds per child process (loading included): " + ", ".join(took) + "."]
    lines += ["", "Settings and failures:", ""]
    for w, r in report["workloads"].items():
        for side, res in r["sides"].items():
            what = res.get("error") or res.get("skipped") or json.dumps(res.get("settings", {}))
            lines.append(f"- {w} / {side}: {what}")
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, fp32, small batches (< 1 min)")
    p.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "gpu"), help="output prefix: writes OUT.json and OUT.md"
    )
    p.add_argument("--work", default="", help="scratch directory (default: a new temporary one)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (dense bf16 H100/H200)")
    p.add_argument(
        "--trl-cache",
        default="static",
        choices=("static", "dynamic", "paged"),
        help="TRL GRPO generation: cache_implementation='static', the default dynamic cache, or "
        "use_transformers_continuous_batching=True (paged)",
    )
    p.add_argument(
        "--micro-batch-tokens", type=int, default=0, help="alignflow train.micro_batch_tokens (0: its default)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=360.0,
        help="seconds for the whole run; jobs that would start after it are skipped (reported)",
    )
    p.add_argument("--job-timeout", type=float, default=170.0, help="seconds per child process")
    p.add_argument("--spawn", action="store_true", help="start children as fresh interpreters instead of forks")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p


def jobs_for(args, only: list[str], base: dict) -> list[dict]:
    sizes = SIZES["smoke" if args.smoke else "full"]
    sizes = {**sizes, "grpo": {**sizes["grpo"], "trl_cache": args.trl_cache}}
    return [
        base | sizes | {"workload": w, "side": side}
        for w in only
        for side in SIDE_ORDER[w]
        if not (args.smoke and side == "vllm")
    ]


def build_machine(args, base: dict, method: str) -> tuple[dict, str]:
    """Build the model and data in a child; the first child to touch the GPU, so if a forked one fails, retry
    with a fresh interpreter and use those from then on. Returns the build record and the start method."""
    machine = run_job(base | {"workload": "model", "side": "build"}, max(args.job_timeout, 300), method)
    if "error" in machine and method == "fork":
        print("bench_gpu: the forked build child failed; retrying with fresh interpreters (--spawn)", flush=True)
        method = "spawn"
        machine = run_job(base | {"workload": "model", "side": "build"}, max(args.job_timeout, 300), method)
    if "error" in machine:
        raise SystemExit(f"building the model failed: {machine['error']}")
    return machine, method


def run_jobs(jobs: list[dict], args, method: str, t0: float) -> dict:
    """Each job in its child, in order, within the time budget; {workload: {side: result}}."""
    results: dict = {}
    for job in jobs:
        w, side = job["workload"], job["side"]
        left = args.budget - (time.perf_counter() - t0)
        if left < 20:
            results.setdefault(w, {})[side] = {"skipped": f"time budget of {args.budget:.0f} s spent"}
            continue
        res = results.setdefault(w, {})[side] = run_job(job, min(args.job_timeout, left), method)
        key, unit = HEADLINE[w]
        shown = f"{res[key]:10.1f} {unit}" if key in res else f"({res.get('skipped') or res.get('error')})"
        print(f"  {w:4s} {side:9s} {shown}  [{res['process_s']:.0f} s]", flush=True)
    return results


def run(args) -> dict:
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in only if w not in WORKLOADS]
    if bad or not only:
        raise SystemExit(f"--only {args.only!r}: choose from {', '.join(WORKLOADS)} (comma-separated)")
    t0 = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="alignflow-gpu-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    method = "spawn" if args.spawn else preload()
    import torch  # imported by preload; the NVML check does not initialise CUDA

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        raise SystemExit(
            "bench_gpu: no CUDA device visible; the full benchmark needs one (0.5B shape). "
            "Use --smoke for the CPU run of the same code on a tiny shape."
        )
    base = {
        "work": str(work),
        "smoke": args.smoke,
        "device": device,
        "threads": 1 if args.smoke else 0,
        "dtype": "float32" if device == "cpu" else "bfloat16",
        "peak_tflops": args.peak_tflops,
        "micro_batch_tokens": args.micro_batch_tokens,
    }
    print(f"bench_gpu: device {device}, work {work}, children by {method}", flush=True)
    machine, method = build_machine(args, base, method)
    base |= {k: machine[k] for k in ("model_dir", "n_params", "prompts_path", "sft_path", "pairs_path")}
    results = run_jobs(jobs_for(args, only, base), args, method, t0)
    return {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "smoke": args.smoke,
        "model": "tiny (smoke)" if args.smoke else "Qwen2.5-0.5B shape, random weights",
        "peak_tflops": args.peak_tflops,
        "device": device,
        "children": method,
        "workloads": summarise(results),
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    args = parser().parse_args()
    if args.child:
        child_main(args.child)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(report, indent=1))
    out.with_name(out.name + ".md").write_text(markdown(report))
    print(markdown(report))
    for w, r in report["workloads"].items():
        print(f"{w}: alignflow / {r['baseline']} = {fmt(r['ratio'], '.2f')}x {r['unit']} (target {r['target']:g}x)")


if __name__ == "__main__":
    main()
