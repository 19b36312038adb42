"""Where a GPU step's time goes, for the 0.5B shape of bench_gpu.py (random weights, built in memory).

Ablations of the rollout engine (CUDA graphs on/off, fused sampling on/off) on 32 prompts x 8 samples x 256 new
tokens with per-prompt seeds (the RL setting), a torch.profiler table of one graphed generation, and the
training forward/backward of one 16k-token padding-free micro-batch with the flash varlen kernel and with the
per-sequence loop (time and achieved TFLOP/s). GPU only:  python bench/gpu_profile.py --out bench/results/gpu_profile
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_scale import QWEN2_05B  # noqa: E402


def build(shape: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa", **shape)
    return Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def timed(fn, repeat: int = 2) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def generation(model, out: dict) -> None:
    import alignflow.rollout.graphs as graphs
    import alignflow.rollout.sampling as sampling
    from alignflow.rollout import HFEngine, SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, 1000, (int(n),), generator=g).tolist() for n in torch.randint(32, 129, (32,), generator=g)
    ]
    engine = HFEngine(model, eos_token_id=2, pad_token_id=0)
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=256, seeds=list(range(32)), logprobs=True)
    for name, use_graphs, use_compile in (
        ("graphs+fused", True, True),
        ("no graphs, fused", False, True),
        ("graphs, eager sampling", True, False),
    ):
        graphs.USE_GRAPHS, sampling.USE_COMPILE = use_graphs, use_compile
        res = {}

        def run(res=res):
            res["batch"] = engine.generate(prompts, params)

        s = timed(run)
        tokens = int(res["batch"]["response_mask"].sum())
        out[f"gen/{name}"] = {"s": s, "tokens": tokens, "tok_per_s": tokens / s, "path": engine.last_path}
        print(name, out[f"gen/{name}"], flush=True)
    graphs.USE_GRAPHS, sampling.USE_COMPILE = True, True
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, params)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    out["gen/profile"] = table
    print(table, flush=True)


def training(model, out: dict, n_params: int) -> None:
    import alignflow.models.varlen as varlen
    from alignflow.models.logprobs import selected_logprobs

    model.train()
    lens = [256] * 64  # 16k tokens
    ids = torch.randint(3, 1000, (1, sum(lens)), device="cuda")
    where = torch.ones_like(ids, dtype=torch.bool)
    where[:, ::256] = False
    for flash in (True, False):
        varlen.USE_FLASH = flash

        def step():
            lp, _ = selected_logprobs(model, ids, where, seq_lens=lens)
            lp.sum().backward()
            model.zero_grad(set_to_none=True)

        s = timed(step, repeat=3)
        flops = 6 * n_params * sum(lens)
        out[f"train/{'flash' if flash else 'loop'}"] = {"s": s, "tflops": flops / s / 1e12, "mfu": flops / s / 989e12}
        print("train", flash, out[f"train/{'flash' if flash else 'loop'}"], flush=True)
    varlen.USE_FLASH = True
    model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_profile"))
    p.add_argument("--skip", default="", help="comma list of parts to skip: gen,train")
    args = p.parse_args()
    model = build(QWEN2_05B)
    h, f, L, kv = 896, 4864, 24, 128
    n_params = L * (2 * h * h + 2 * h * kv + 3 * h * f) + h * QWEN2_05B["vocab_size"]
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "params_for_flops": n_params}
    if "train" not in args.skip:
        training(model, out, n_params)
    if "gen" not in args.skip:
        generation(model, out)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
