"""DPO training throughput and memory: alignflow ``train_po`` vs TRL ``DPOTrainer`` on the identical workload.

Workload (see ``bench/common.py``): the tiny Llama of the SFT/RM benches (hidden 256, 4 layers, 4 heads, MLP 1024,
the reviews vocabulary), preference pairs whose chosen and rejected sequences are each 16-256 tokens (uniform,
independent), DPO (sigmoid) loss with beta 0.1, the reference = the initial policy, 32 pairs per optimiser step,
AdamW lr 1e-4 constant, grad-norm clip 1.0, fp32, the same number of torch threads, 2 warm-up steps, then
``--steps`` timed steps. Reported: pairs/s (pairs of the timed steps / their wall time), tokens/s (real chosen +
rejected tokens), and memory (below).

TRL settings (``--sweep`` times each once and keeps the fastest; TRL 1.16's ``padding_free`` is "temporarily
unavailable" for DPO -- it warns and pads -- so it is not a separate mode):

* ``padded``          DPOConfig defaults: a reference model in memory and a reference forward every step; random
                      batches of 32 pairs -> 64 rows padded to the longest.
* ``precompute``      ``precompute_ref_log_probs=True``: reference log-probs computed once before training, no
                      reference model kept (what alignflow always does).
* ``precompute_gbl``  + ``train_sampling_strategy="group_by_length"`` on a ``length`` column (the longer sequence
                      of the pair): steps of similar lengths (changes which pairs share a step).
* ``precompute_rebalance`` + ``train_sampling_strategy="batch_rebalance"``, 4 x 8 gradient accumulation: the same
                      32 pairs per step in length-balanced micro-batches.

alignflow: ``packed`` (default; chosen and rejected of a micro-batch laid end to end in one padding-free row) or
``padded`` (length-sorted right-padded micro-batches), both with ``train.micro_batch_tokens=2048`` (about as many
micro-batches per step as TRL's fastest setting; see ``MICRO_BATCH_TOKENS``). The reference
log-probs are computed once before training on both sides (alignflow's cache is off here, so every run computes
them); that time is reported as ``ref_precompute_s`` and is not in the timed window.

Memory, measured the same way on both sides: ``peak_rss_mb`` is the process's peak resident set size
(``getrusage``, everything: interpreter, libraries, models, data); ``train_rss_mb`` is the peak RSS sampled every
5 ms during the training steps minus the RSS when the first step starts (activations, gradients, optimiser state).

All TRL runs: ``activation_checkpointing=False`` and ``bf16=False`` (TRL defaults to True for both),
``max_length=256`` (nothing is cut), no logging/saving/eval, ``dataloader_num_workers=0``, the default optimiser.
TRL is given alignflow's token ids (``prompt_ids``/``chosen_ids``/``rejected_ids`` columns); its text
preprocessing (``_prepare_dataset``) is skipped because TRL 1.16 has no pre-tokenised entry point for DPO.

    python bench/bench_dpo.py [--steps 10] [--repeats 2] [--sweep]      # writes bench/results/dpo.{json,md}
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TRL_MODES = ("padded", "precompute", "precompute_gbl", "precompute_rebalance")
ALIGNFLOW_MODES = ("packed", "padded")
NAME, UNIT = "dpo", "pairs"
MAX_LEN_DATA = 256  # every sequence fits: no truncation on either side
BETA, LR = 0.1, 1e-4
# alignflow's micro-batch budget: ~4-5 micro-batches per step of ~8.7k tokens, the granularity of TRL's fastest
# setting (4 x 8 pairs). Speed is the same at 2048-16384 on this CPU (matmul-bound); memory grows with the budget
# (docs/benchmarks.md has the 8192 default's numbers).
MICRO_BATCH_TOKENS = 2048


# ------------------------------------------------------------------------------------------ memory
class RSSPeak:
    """Peak resident set size of this process, sampled every 5 ms by a daemon thread from ``start()`` on."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()

    def rss_mb(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page / 2**20

    def start(self) -> None:
        if self.start_mb:
            return
        self.start_mb = self.peak_mb = self.rss_mb()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def result(self) -> dict:
        self._stop.set()
        self.peak_mb = max(self.peak_mb, self.rss_mb())
        return {
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "train_rss_mb": self.peak_mb - self.start_mb,
            "rss_at_first_step_mb": self.start_mb,
        }


def _pairs_result(clock: common.StepClock, batch: int, mem: RSSPeak, ref_s: float) -> dict:
    res = clock.result()
    return (
        res
        | {
            "pairs_per_s": batch * clock.timed / res["seconds"],
            "pairs_per_cpu_s": batch * clock.timed / res["cpu_seconds"],
            "ref_precompute_s": ref_s,
        }
        | mem.result()
    )


# ------------------------------------------------------------------------------------------ sides
def alignflow_side(args, wl: dict, mode: str) -> dict:
    from alignflow.config import POConfig, from_dict
    from alignflow.trainers import loop, po, po_rows

    clock, mem, ref_s = common.StepClock(args.warmup, args.steps), RSSPeak(), [0.0]
    real_step, real_opt, real_ref = po_rows.po_step, loop.optimizer_step, po.compute_ref_logps

    def counted_step(model, rows, *a, **k):
        mem.start()
        clock.tokens.append(sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows))
        return real_step(model, rows, *a, **k)

    def timed_opt(*a, **k):
        out = real_opt(*a, **k)
        clock.mark()
        return out

    def timed_ref(*a, **k):
        t0 = time.perf_counter()
        out = real_ref(*a, **k)
        ref_s[0] += time.perf_counter() - t0
        return out

    po_rows.po_step, loop.optimizer_step, po.compute_ref_logps = counted_step, timed_opt, timed_ref
    cfg = from_dict(
        POConfig,
        {
            "model": {"name_or_path": wl["model_dir"], "tokenizer": wl["tokenizer_dir"]},
            "data": {
                "path": wl["pairs_path"],
                "max_len": MAX_LEN_DATA,
                "max_prompt_len": MAX_LEN_DATA,
                "eval_fraction": 0.0,
            },
            "optim": {
                "lr": LR,
                "scheduler": "constant",
                "warmup_ratio": 0.0,
                "max_grad_norm": 1.0,
                "weight_decay": 0.0,
            },
            "loss": {"name": "dpo", "beta": BETA},
            "ref_cache": False,
            "train": {
                "overwrite": True,
                "output_dir": str(Path(args.work) / "alignflow-dpo"),
                "batch_size": args.batch,
                "max_steps": args.warmup + args.steps,
                "progress": False,
                "log_every": 10**6,
                "mixed_precision": "none",
                "device": "cpu",
                "num_threads": args.threads,
                "seed": 0,
                "packing": mode == "packed",
                "micro_batch_tokens": MICRO_BATCH_TOKENS,
            },
        },
    )
    po.train_po(cfg)
    return _pairs_result(clock, args.batch, mem, ref_s[0]) | {
        "settings": {
            "train.packing": mode == "packed",
            "loss": "dpo",
            "beta": BETA,
            "train.micro_batch_tokens": cfg.train.micro_batch_tokens,
            "reference": "initial policy, computed once",
        }
    }


def _trl_dataset(wl: dict, with_length: bool):
    """alignflow's token ids split into TRL's ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` columns."""
    from datasets import Dataset

    from alignflow.config import POConfig
    from alignflow.models import load_tokenizer

    tok = load_tokenizer(wl["tokenizer_dir"])
    rows = common.encoded_rows(
        POConfig,
        {"path": wl["pairs_path"], "max_len": MAX_LEN_DATA, "max_prompt_len": MAX_LEN_DATA, "eval_fraction": 0.0},
        tok,
    )
    cols = {
        "prompt_ids": [r["chosen_ids"][: r["prompt_len"]] for r in rows],
        "chosen_ids": [r["chosen_ids"][r["prompt_len"] :] for r in rows],
        "rejected_ids": [r["rejected_ids"][r["prompt_len"] :] for r in rows],
    }
    for r in rows:  # both sides train on the same sequences
        assert r["rejected_ids"][: r["prompt_len"]] == r["chosen_ids"][: r["prompt_len"]]
    if with_length:
        cols["length"] = [max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    return tok, Dataset.from_dict(cols)


def trl_settings(mode: str, batch: int) -> dict:
    """DPOConfig keyword arguments of a TRL mode."""
    if mode == "padded":
        return {"per_device_train_batch_size": batch}
    pre = {"precompute_ref_log_probs": True, "precompute_ref_batch_size": batch}
    if mode == "precompute":
        return pre | {"per_device_train_batch_size": batch}
    if mode == "precompute_gbl":
        return pre | {
            "per_device_train_batch_size": batch,
            "train_sampling_strategy": "group_by_length",
            "remove_unused_columns": False,
        }
    if mode == "precompute_rebalance":
        return pre | {
            "per_device_train_batch_size": batch // 4,
            "gradient_accumulation_steps": 4,
            "train_sampling_strategy": "batch_rebalance",
            "remove_unused_columns": False,
        }
    raise ValueError(f"unknown TRL mode {mode!r}; choose from {', '.join(TRL_MODES)}")


def trl_side(args, wl: dict, mode: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class PreTokenised(DPOTrainer):
        def _prepare_dataset(self, dataset, *_, **__):  # the columns are already TRL's tokenised ones
            return dataset

        def _precompute_ref_logps(self, *a, **k):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            ref_s[0] += time.perf_counter() - t0
            return out

    settings = trl_settings(mode, args.batch)
    tok, ds = _trl_dataset(wl, with_length="train_sampling_strategy" in settings)
    clock, mem, ref_s = common.StepClock(args.warmup, args.steps), RSSPeak(), [0.0]
    accum = settings.get("gradient_accumulation_steps", 1)
    targs = DPOConfig(
        output_dir=str(Path(args.work) / f"trl-dpo-{mode}"),
        max_steps=args.warmup + args.steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        activation_checkpointing=False,
        max_length=MAX_LEN_DATA,
        beta=BETA,
        loss_type=["sigmoid"],
        logging_steps=10**6,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=0,
        **settings,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(wl["model_dir"], dtype=torch.float32)

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            mem.start()

        def on_step_end(self, *_, **__):
            clock.mark()

    trainer = PreTokenised(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    computed = clock.count_batches(trainer, accum)
    trainer.train()
    shown = settings | {
        "activation_checkpointing": False,
        "bf16": False,
        "beta": BETA,
        "loss_type": "sigmoid",
        "optim": getattr(targs.optim, "value", str(targs.optim)),
    }
    return _pairs_result(clock, args.batch, mem, ref_s[0]) | {
        "settings": shown,
        "pad_fraction": 1 - computed[0] / computed[1],
    }


# ------------------------------------------------------------------------------------------ report
def summarise(result: dict) -> dict:
    """Add pairs/s and memory medians (and their ratios) to ``common.compare``'s record."""
    for side in ("alignflow", "trl"):
        runs = result[side]["runs"]
        for key in ("pairs_per_s", "pairs_per_cpu_s", "peak_rss_mb", "train_rss_mb", "ref_precompute_s"):
            result[side][f"median_{key}"] = statistics.median(r[key] for r in runs)
    for s in result["trl_sweep"].values():
        for key in ("pairs_per_s", "peak_rss_mb", "train_rss_mb"):
            s[f"median_{key}"] = statistics.median(r[key] for r in s["runs"])
    a, t = result["alignflow"], result["trl"]
    result["pairs_ratio"] = a["median_pairs_per_s"] / t["median_pairs_per_s"]
    result["pairs_cpu_ratio"] = a["median_pairs_per_cpu_s"] / t["median_pairs_per_cpu_s"]
    return result


def report(r: dict) -> str:
    """bench/results/dpo.md: the headline, every TRL setting of the sweep, the settings of both sides."""
    m, a, t = r["machine"], r["alignflow"], r["trl"]
    lines = [
        "# alignflow vs TRL: DPO training",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared), torch threads {m['threads']}; torch {m['torch']}, "
        f"transformers {m['transformers']}, trl {m['trl']}; {m['date']}, 1-min load at start "
        f"{m['load_average_1m_at_start']:.2f}. {r['pairs_per_step']} pairs per step, {r['warmup']} warm-up + "
        f"{r['steps']} timed steps, medians of {len(a['runs'])} alternated runs. Regenerate with "
        "`python bench/bench_dpo.py --sweep`; workload and method in `docs/benchmarks.md`.",
        "",
        "| | alignflow | TRL | alignflow / TRL |",
        "|---|---:|---:|---:|",
        f"| setting | `{r['alignflow_mode']}` | `{r['trl_mode']}` | |",
        f"| pairs/s (wall) | {a['median_pairs_per_s']:.2f} | {t['median_pairs_per_s']:.2f} | "
        f"**{r['pairs_ratio']:.2f}x** |",
        f"| pairs/s (CPU time) | {a['median_pairs_per_cpu_s']:.2f} | {t['median_pairs_per_cpu_s']:.2f} | "
        f"{r['pairs_cpu_ratio']:.2f}x |",
        f"| tokens/s | {a['median_tokens_per_s']:.0f} | {t['median_tokens_per_s']:.0f} | {r['ratio']:.2f}x |",
        f"| peak RSS, whole process (MB) | {a['median_peak_rss_mb']:.0f} | {t['median_peak_rss_mb']:.0f} | "
        f"{a['median_peak_rss_mb'] / t['median_peak_rss_mb']:.2f}x |",
        f"| RSS growth during training (MB) | {a['median_train_rss_mb']:.0f} | {t['median_train_rss_mb']:.0f} | "
        f"{a['median_train_rss_mb'] / max(t['median_train_rss_mb'], 1e-9):.2f}x |",
        f"| reference precompute (s, untimed) | {a['median_ref_precompute_s']:.1f} | "
        f"{t['median_ref_precompute_s']:.1f} | |",
    ]
    pads = [run["pad_fraction"] for run in t["runs"] if "pad_fraction" in run]
    if pads:
        ours = "0 (padding-free)" if r["alignflow_mode"] == "packed" else "n/a"
        lines.append(f"| computed tokens that are padding | {ours} | {statistics.median(pads):.0%} | |")
    if r["trl_sweep"]:
        lines += [
            "",
            f"Every TRL setting ({r['trl_sweep_steps']} timed steps, one run each; ratio = alignflow "
            "median / this run):",
            "",
            "| TRL setting | pairs/s | peak RSS (MB) | RSS growth (MB) | alignflow / TRL (pairs/s) |",
            "|---|---:|---:|---:|---:|",
        ]
        for mode, s in r["trl_sweep"].items():
            lines.append(
                f"| {mode} | {s['median_pairs_per_s']:.2f} | {s['median_peak_rss_mb']:.0f} | "
                f"{s['median_train_rss_mb']:.0f} | {a['median_pairs_per_s'] / s['median_pairs_per_s']:.2f}x |"
            )
    lines += [
        "",
        f"Settings: alignflow `{json.dumps(a['runs'][0]['settings'])}`; TRL `{json.dumps(t['runs'][0]['settings'])}`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = common.bench_parser(__doc__, TRL_MODES, ALIGNFLOW_MODES).parse_args()
    if args.side != "main":
        common.set_threads(args.threads)
        wl = json.loads((Path(args.work) / "workload.json").read_text())
        side = alignflow_side if args.side == "alignflow" else trl_side
        Path(args.out).write_text(json.dumps(side(args, wl, args.mode)))
        return
    result = summarise(common.run_bench(__file__, NAME, UNIT, TRL_MODES, args))
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=1))
    (out / f"{NAME}.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
