"""Tokens/s of alignflow's ``HFEngine`` vs transformers' ``model.generate`` on the identical workload.

Model: the project's random-init tiny Llama (``tasks.common.init_model``: hidden 256, 4 layers, 4 heads, MLP
1024) over the ``reviews`` task's tokenizer (255 tokens; pad 0, bos 1, eos 2). Two workloads, both a
batch of 64 sequences, 64 new tokens, ancestral sampling with temperature 1, top-k 50, top-p 0.95:

* ``distinct``: 64 different prompts of 8-32 tokens (left-padded);
* ``grouped``: the online-RL shape, 8 prompts x 8 samples each (GRPO group size 8). ``HFEngine`` gets
  ``SamplingParams(n=8)``; ``generate`` gets ``num_return_sequences=8`` (it expands the prompts to 64 rows
  before its prefill; that is how it samples a group).

Realistic EOS: a random-init model almost never emits EOS (p ~ 1/255 per step), so no row would end early
and the row-dropping engine could show nothing. The model's ``lm_head`` is replaced by a ``Linear`` with a bias
that is zero except ``+EOS_BIAS`` on the EOS logit, tuned so that about half of the rows end before the 64th
token. Both engines get this same model, the same prompts, the same EOS id and the same sampling parameters;
sampling draws differ, so each side's tokens/s counts the tokens it really generated (response_mask 1 for
alignflow, tokens up to and including EOS for generate), and the finished-row fractions are printed too.

Runs alternate (generate, engine, generate, engine, ...) after a warm-up; medians of the runs are reported,
as tokens per wall-clock second and per CPU second of this process (the machine is shared, and CPU time is
less sensitive to other processes than wall time).

    python bench/bench_generate.py [--runs 5] [--workload both|distinct|grouped] [--new 64] [--threads N]
                                   [--hf-forward] [--plain] [--profile]

--hf-forward adds ``HFEngine(fast_path=False)`` (the model's own forward instead of the lean one);
--plain adds ``HFEngine(fast_path=False, preallocate=False)`` (transformers' DynamicCache, torch.cat per step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from alignflow.config import TaskConfig  # noqa: E402
from alignflow.rollout import HFEngine, SamplingParams  # noqa: E402
from alignflow.tasks import reviews  # noqa: E402
from alignflow.tasks.common import SPECIAL_TOKENS, build_tokenizer, init_model  # noqa: E402

EOS_BIAS = 0.35  # EOS logit bias: about half of the rows emit EOS within 64 sampled tokens
TOKENIZER = build_tokenizer(reviews.TASK.vocab, reviews.TASK.join)  # the `reviews` task's word-level tokenizer
EOS, PAD, BOS = TOKENIZER.eos_token_id, TOKENIZER.pad_token_id, TOKENIZER.bos_token_id


def build_model(seed: int = 0) -> LlamaForCausalLM:
    """The project's tiny Llama (``tasks.common.init_model``: tied embeddings, sdpa) at hidden 256, 4 layers,
    4 heads, MLP 1024, over the reviews vocabulary, with the EOS-biased ``lm_head`` described above."""
    cfg = TaskConfig(seed=seed, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
    model = init_model(cfg, TOKENIZER).eval()
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[EOS] = EOS_BIAS
    model.lm_head = head
    return model


def build_prompts(count: int, seed: int = 1) -> list[list[int]]:
    """``count`` prompts of 8-32 tokens: <bos> then random ordinary (non-special) words of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 33, (count,), generator=g).tolist()
    first, vocab = len(SPECIAL_TOKENS), len(TOKENIZER)
    return [[BOS] + torch.randint(first, vocab, (n - 1,), generator=g).tolist() for n in lengths]


def run_generate(model, prompts, n, args, seed) -> tuple[float, float, int, float]:
    """(wall seconds, CPU seconds, generated tokens, fraction of rows that ended with EOS) for model.generate."""
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    ids, mask = engine._left_pad(prompts)  # the same left-padded tensors the engine prefills
    torch.manual_seed(seed)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=50,
            top_p=0.95,
            max_new_tokens=args.new,
            eos_token_id=EOS,
            pad_token_id=PAD,
            num_return_sequences=n,
        )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    new = out[:, ids.shape[1] :]  # (B, Tr)
    is_eos = new == EOS
    ended = is_eos.any(dim=1)  # (B,)
    length = torch.where(ended, is_eos.float().argmax(dim=1) + 1, new.shape[1])  # (B,) tokens up to EOS
    return seconds, cpu, int(length.sum()), float(ended.float().mean())


def run_engine(model, prompts, n, args, seed, **engine_kwargs) -> tuple[float, float, int, float]:
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS, **engine_kwargs)
    params = SamplingParams(n=n, temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=args.new, seed=seed)
    start, cpu = time.perf_counter(), time.process_time()
    batch = engine.generate(prompts, params)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert engine.last_path == ("hf" if engine_kwargs.get("fast_path") is False else "lean"), engine.fallback_reason
    ended = sum(r == "eos" for r in batch["finish_reason"]) / len(batch)
    return seconds, cpu, int(batch["response_mask"].sum()), ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="sequences per generate call")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt in the grouped workload")
    parser.add_argument("--workload", choices=("both", "distinct", "grouped"), default="both")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 keeps torch's default)")
    parser.add_argument("--hf-forward", action="store_true", help="also run HFEngine(fast_path=False)")
    parser.add_argument("--plain", action="store_true", help="also run HFEngine(fast_path=False, preallocate=False)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one engine run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch % args.group:
        parser.error(f"--batch {args.batch} is not a multiple of --group {args.group}")
    model = build_model()
    workloads = {
        "distinct": (build_prompts(args.batch), 1),
        "grouped": (build_prompts(args.batch // args.group, seed=2), args.group),
    }
    if args.workload != "both":
        workloads = {args.workload: workloads[args.workload]}
    contenders = {"model.generate": run_generate, "HFEngine": run_engine}
    if args.hf_forward:
        contenders["HFEngine(hf fwd)"] = lambda *a: run_engine(*a, fast_path=False)
    if args.plain:
        contenders["HFEngine(plain)"] = lambda *a: run_engine(*a, fast_path=False, preallocate=False)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, (prompts, n) in workloads.items():
            run_engine(model, prompts, n, args, 0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run_engine(model, prompts, n, args, 0)
            print(f"== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return
    results = {(w, c): [] for w in workloads for c in contenders}
    for fn in contenders.values():  # warm-up
        for prompts, n in workloads.values():
            fn(model, prompts, n, args, 0)
    for r in range(args.runs):  # alternate, so that load from other processes hits every contender alike
        for w, (prompts, n) in workloads.items():
            for c, fn in contenders.items():
                results[w, c].append(fn(model, prompts, n, args, 100 + r))
    for w, (prompts, n) in workloads.items():
        print(f"== workload {w}: {len(prompts)} prompts x {n} samples")
        report({c: results[w, c] for c in contenders}, args)


def report(results: dict, args) -> None:
    """Median tokens/s by wall clock and by process CPU time (less sensitive to other processes)."""

    def med(runs, i):
        return statistics.median(r[2] / r[i] for r in runs)

    for name, runs in results.items():
        print(
            f"{name:16s} wall {med(runs, 0):6.0f} tok/s | cpu {med(runs, 1):6.0f} tok/s | median wall "
            f"{statistics.median(r[0] for r in runs):6.3f} s | median tokens "
            f"{statistics.median(r[2] for r in runs):.0f}"
            f" | rows ended by EOS {statistics.mean(r[3] for r in runs):.0%}"
        )
    hf = results["model.generate"]
    for name, runs in results.items():
        if name != "model.generate":
            paired = [
                statistics.median((r[2] / r[i]) / (g[2] / g[i]) for r, g in zip(runs, hf, strict=False)) for i in (0, 1)
            ]
            print(
                f"ratio {name} / generate: wall {med(runs, 0) / med(hf, 0):.2f}x, cpu {med(runs, 1) / med(hf, 1):.2f}x"
                f" (median of per-run ratios: wall {paired[0]:.2f}x, cpu {paired[1]:.2f}x)"
            )
    print(
        f"(batch {args.batch}, {args.new} new tokens, {torch.get_num_threads()} threads, {args.runs} runs, "
        f"torch {torch.__version__})"
    )


if __name__ == "__main__":
    main()
