"""GRPO at model scale on one GPU (issue 5): a ~0.5B-parameter Qwen2-style model with random weights.

Workload: the Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocabulary 151,936,
tied embeddings: 494M parameters) with random weights, a word-level tokenizer over the same vocabulary
(letters-only words, so every sampled id decodes), prompts of 32-128 random words, and a rule reward (the share
of distinct tokens in the response) so that advantages are not zero. GRPO with ``rollout.n`` samples per prompt,
bf16 autocast, the built-in engine (or ``--backend vllm`` when vLLM is installed), the run's own defaults
otherwise. Nothing here depends on a hub or a dataset.

Reported per step (medians over the steps after ``--warmup``): step time, generation share
(``perf/gen_share``), tokens per second (prompt + response tokens of the batch / step time), and model FLOPs
utilisation::

    MFU = FLOPs / (step time x peak)        FLOPs = 2 N [(P + R) x passes + R + P / n]
    passes = ref forward (1 with a KL term) + update forward and backward (3)
             (+ 1 old-log-prob forward when it is recomputed)

with N the parameter count (embedding excluded, LM head included: the standard 6N-per-token rule, attention
FLOPs not counted), P / R the prompt / response tokens of the batch, R the decoded tokens and P / n the prefilled
ones (one prefill per distinct prompt). Peak: ``--peak-tflops`` (default 989, the dense bf16 figure of an H100/H200
SXM).

Run it (GPU):  ``python bench/bench_scale.py --steps 6``  -> ``bench/results/scale_gpu.md`` and ``.json``.
A CPU smoke run of the same code on a tiny shape:  ``python bench/bench_scale.py --tiny --steps 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN2_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
)


def distinct_reward(prompts, responses, **_):
    """Share of distinct words in the response (a cheap rule reward with spread, so GRPO's advantages are not 0)."""
    out = []
    for r in responses:
        words = r.split()
        out.append(len(set(words)) / len(words) if words else 0.0)
    return out


def word(i: int) -> str:
    """The i-th letters-only word ("a", "b", ..., "ba", ...): the tokenizer splits digits, so no digits."""
    out = ""
    while True:
        out = chr(97 + i % 26) + out
        i //= 26
        if not i:
            return out


def build_model(work: Path, shape: dict) -> Path:
    """A random-weight Qwen2 model and a word-level tokenizer covering its whole vocabulary (every sampled id
    decodes to a word), saved under ``work/model``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from alignflow.tasks.common import SPECIAL_TOKENS, build_tokenizer

    tok = build_tokenizer([word(i) for i in range(shape["vocab_size"] - len(SPECIAL_TOKENS))])
    assert len(tok) == shape["vocab_size"], (len(tok), shape["vocab_size"])
    out = work / "model"
    torch.manual_seed(0)
    config = Qwen2Config(
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_prompts(work: Path, vocab: int, count: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path = work / "prompts.jsonl"
    with path.open("w") as f:
        for _ in range(count):
            words = " ".join(word(rng.randrange(vocab // 2)) for _ in range(rng.randint(32, 128)))
            f.write(json.dumps({"prompt": words}) + "\n")
    return path


def params_without_embedding(model_dir: Path) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, f, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    per_layer = h * h * 2 + 2 * h * kv + (h + 2 * kv) + 3 * h * f + 2 * h  # q,o; k,v; qkv bias; mlp; norms
    return layers * per_layer + h + h * c.vocab_size  # + final norm + LM head (tied: counted once, as compute)


def run(args) -> dict:
    import torch

    from alignflow.config import RLConfig, from_dict
    from alignflow.trainers.rl import train_rl

    work = Path(args.work or tempfile.mkdtemp(prefix="alignflow-scale-"))
    shape = TINY if args.tiny else QWEN2_05B
    model_dir = build_model(work, shape)
    prompts = write_prompts(work, shape["vocab_size"], args.prompts * (args.steps + 1))
    cfg = from_dict(
        RLConfig,
        {
            "model": {"name_or_path": str(model_dir), "dtype": "float32" if args.tiny else "bfloat16"},
            "data": {"path": str(prompts), "max_prompt_len": 256},
            "algo": {"name": "grpo"},
            "kl": {"coef": 0.04},
            "reward": {"functions": {"bench.bench_scale:distinct_reward": 1.0}},
            "rollout": {
                "prompts_per_step": args.prompts,
                "n": args.n,
                "max_new_tokens": args.max_new_tokens,
                "eval_prompts": 0,
                "backend": args.backend,
            },
            "optim": {"lr": 1e-6},
            "train": {
                "overwrite": True,
                "output_dir": str(work / "run"),
                "batch_size": args.prompts * args.n,
                "max_steps": args.steps,
                "progress": False,
                "micro_batch_tokens": args.micro_batch_tokens,
            },
        },
    )
    t0 = time.perf_counter()
    result = train_rl(cfg)
    wall = time.perf_counter() - t0
    steps = result.history[args.warmup :] or result.history
    n_params = params_without_embedding(model_dir)
    med = lambda k: statistics.median(h[k] for h in steps)  # noqa: E731
    step_s = med("perf/step_s")
    tokens_per_s = med("perf/tokens_per_s")
    resp_len = med("rollout/response_len")
    rows = args.prompts * args.n
    train_tokens = tokens_per_s * step_s  # prompt + response tokens of the batch
    gen_tokens = rows * resp_len
    passes = 1 + 3  # reference forward + update forward/backward (old log-probs reused: one update per batch)
    flops = 2 * n_params * (train_tokens * passes + gen_tokens + (train_tokens - gen_tokens) / args.n)
    peak = args.peak_tflops * 1e12
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "model": "tiny" if args.tiny else "qwen2-0.5b-shape (random weights)",
        "params_non_embedding_plus_head": n_params,
        "prompts": args.prompts,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "steps": len(result.history),
        "timed_steps": len(steps),
        "step_s": step_s,
        "gen_share": med("perf/gen_share"),
        "tokens_per_s": tokens_per_s,
        "response_len": resp_len,
        "mfu": flops / (step_s * peak),
        "wall_s": wall,
        "backend": args.backend,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny shape (CPU smoke run)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--backend", default="builtin", choices=("builtin", "vllm"))
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--work", default="")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale_gpu"))
    args = p.parse_args()
    res = run(args)
    print(json.dumps(res, indent=1))
    if not args.tiny:
        Path(args.out + ".json").write_text(json.dumps(res, indent=1))
        Path(args.out + ".md").write_text(
            f"# GRPO, {res['model']}, one GPU ({res['device']})\n\n"
            f"{res['prompts']} prompts x {res['n']} samples, <= {res['max_new_tokens']} new tokens, bf16, "
            f"backend {res['backend']}; medians of {res['timed_steps']} steps after warm-up.\n\n"
            "| step time (s) | generation share | tokens/s | mean response length | MFU |\n|---:|---:|---:|---:|---:|\n"
            f"| {res['step_s']:.2f} | {res['gen_share']:.0%} | {res['tokens_per_s']:.0f} | "
            f"{res['response_len']:.0f} | {res['mfu']:.1%} |\n"
        )


if __name__ == "__main__":
    main()
