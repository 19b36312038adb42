"""Workload ``gen`` of ``bench/bench_gpu.py``: generation alone, alignflow's ``HFEngine`` against transformers'
``model.generate`` and, when it is importable, vLLM; one child process per side (see ``gpu_sides.py``)."""

from __future__ import annotations

import json
import time

from gpu_sides import load_hf_model, peak_mem, sync, tokenizer


def gen_prompts(job: dict) -> list[list[int]]:
    tok = tokenizer(job)
    with open(job["prompts_path"]) as f:
        texts = [json.loads(line)["prompt"] for _, line in zip(range(job["gen"]["prompts"]), f, strict=False)]
    return [tok(t)["input_ids"] for t in texts]


def timed_runs(job: dict, run) -> dict:
    """``run(seed)`` -> generated tokens; one warm-up call, then ``gen.runs`` timed calls."""
    run(0)
    seconds, tokens = [], []
    for r in range(job["gen"]["runs"]):
        sync(job)
        t0 = time.perf_counter()
        tokens.append(run(100 + r))
        sync(job)
        seconds.append(time.perf_counter() - t0)
    rows = job["gen"]["prompts"] * job["gen"]["n"]
    return {
        "seconds": sum(seconds),
        "tokens": sum(tokens),
        "rate": sum(tokens) / sum(seconds),
        "tokens_per_s": sum(tokens) / sum(seconds),
        "run_s": seconds,
        "rows": rows,
        "mean_tokens_per_row": sum(tokens) / (rows * len(tokens)),
    } | peak_mem(job)


def gen_alignflow(job: dict) -> dict:
    from alignflow.rollout import HFEngine, SamplingParams

    g, prompts, tok = job["gen"], gen_prompts(job), tokenizer(job)
    model = load_hf_model(job).eval()
    engine = HFEngine(model, tok)

    def run(seed: int) -> int:
        params = SamplingParams(
            n=g["n"], temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=g["new_tokens"], seed=seed
        )
        return int(engine.generate(prompts, params)["response_mask"].sum())

    res = timed_runs(job, run)
    return res | {
        "settings": {"engine": "HFEngine", "path": engine.last_path, "fallback_reason": engine.fallback_reason}
    }


def gen_generate(job: dict) -> dict:
    import torch

    g, prompts, tok = job["gen"], gen_prompts(job), tokenizer(job)
    model = load_hf_model(job).eval()
    width = max(map(len, prompts))
    pad, eos = tok.pad_token_id, tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=job["device"])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=job["device"])

    def run(seed: int) -> int:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=g["new_tokens"],
                num_return_sequences=g["n"],
                eos_token_id=eos,
                pad_token_id=pad,
            )
        new = out[:, width:]
        is_eos = new == eos
        ended = is_eos.any(dim=1)
        length = torch.where(ended, is_eos.float().argmax(dim=1) + 1, new.shape[1])  # tokens up to EOS
        return int(length.sum())

    return timed_runs(job, run) | {
        "settings": {"generate": "transformers model.generate, default (dynamic) cache", "num_return_sequences": g["n"]}
    }


def gen_vllm(job: dict) -> dict:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not importable here"}
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    g, prompts = job["gen"], gen_prompts(job)
    llm = LLM(model=job["model_dir"], dtype=job["dtype"], gpu_memory_utilization=0.5, seed=0)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]

    def run(seed: int) -> int:
        params = SamplingParams(n=g["n"], temperature=1.0, top_p=1.0, top_k=-1, max_tokens=g["new_tokens"], seed=seed)
        outs = llm.generate(inputs, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    res = timed_runs(job, run)
    return res | {
        "settings": {"vllm": "LLM.generate, gpu_memory_utilization 0.5"},
        "peak_mem_kind": "n/a (vLLM allocates its own pool)",
    }
