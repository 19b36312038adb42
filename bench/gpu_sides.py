"""The child runs of ``bench/bench_gpu.py``: one function per (workload, side), each run in its own process
(generation: ``gpu_gen.py``).

Every function takes the job (a JSON-able dict written by the driver: paths, sizes, device, dtype) and returns a
JSON-able dict with its rate, its timed window and ``peak_mem_mb``. Timing uses wall clock with a device
synchronisation at each mark, so that queued GPU work is inside the window it belongs to. The workload, the
settings of both sides and the formulas are described in ``bench/bench_gpu.py``.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import bench_rl
import bench_scale
import common

MAX_PROMPT_LEN = 1024  # prompts are never cut on either side (bench_scale: 32-128 words)

# ------------------------------------------------------------------------------------------ shared pieces


def sync(job: dict) -> None:
    import torch

    if job["device"] == "cuda":
        torch.cuda.synchronize()


def peak_mem(job: dict) -> dict:
    """torch.cuda.max_memory_allocated on a GPU; the process's peak resident set size on CPU."""
    import torch

    if job["device"] == "cuda":
        return {
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_mem_kind": "torch.cuda.max_memory_allocated",
        }
    return {
        "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_mem_kind": "process peak RSS (CPU)",
    }


def mfu(job: dict, tokens: float, seconds: float, passes: int = 3) -> float:
    """2 N x passes x tokens / (seconds x peak): forward (1 pass) + backward (2 passes) = the 6N rule."""
    return 2 * job["n_params"] * passes * tokens / (seconds * job["peak_tflops"] * 1e12)


def load_hf_model(job: dict):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if job["dtype"] == "bfloat16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype).to(job["device"])


def tokenizer(job: dict):
    from alignflow.models import load_tokenizer

    return load_tokenizer(job["model_dir"])


def trl_common(job: dict, config_cls, name: str, steps: int) -> dict:
    """TrainingArguments shared by the TRL sides: no checkpointing of activations, no logging/saving/eval,
    bf16 on a GPU (the model is loaded in bf16 too: pure bf16 on both sides), fp32 on CPU."""
    gpu = job["device"] == "cuda"
    kw = dict(
        output_dir=str(Path(job["work"]) / f"trl-{name}"),
        max_steps=steps,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=gpu,
        fp16=False,
        use_cpu=not gpu,
        gradient_checkpointing=False,
        logging_steps=10**6,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=0,
    )
    if "activation_checkpointing" in config_cls.__dataclass_fields__:
        kw["activation_checkpointing"] = False
    return kw


def clock_callback(job: dict, mark):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            sync(job)
            mark()

    return Clock()


def alignflow_common(job: dict, name: str, steps: int) -> dict:
    gpu = job["device"] == "cuda"
    train = {
        "output_dir": str(Path(job["work"]) / f"alignflow-{name}"),
        "max_steps": steps,
        "progress": False,
        "log_every": 10**6,
        "seed": 0,
        "overwrite": True,
        "device": job["device"],
        "mixed_precision": "auto" if gpu else "none",
    }
    if job.get("micro_batch_tokens"):
        train["micro_batch_tokens"] = job["micro_batch_tokens"]
    return {"model": {"name_or_path": job["model_dir"], "dtype": job["dtype"]}, "train": train}


# ------------------------------------------------------------------------------------------ a. GRPO step
def grpo_result(job: dict, tally, update_s: list, train_tokens: list) -> dict:
    w, n = job["grpo"]["warmup"], job["grpo"]["steps"]
    res = tally.result()
    upd, tokens = sum(update_s[w : w + n]), sum(train_tokens[w : w + n])
    return (
        res
        | {
            "step_s_mean": res["seconds"] / n,
            "update_s": upd,
            "train_tokens": tokens,
            "update_mfu": mfu(job, tokens, upd),
            "rate": res["completions_per_s"],
        }
        | peak_mem(job)
    )


def grpo_alignflow(job: dict) -> dict:
    from alignflow.config import RLConfig, from_dict
    from alignflow.trainers import rl as online

    g = job["grpo"]
    base = alignflow_common(job, "grpo", g["warmup"] + g["steps"])
    rows = g["prompts"] * g["n"]
    cfg = from_dict(
        RLConfig,
        base
        | {
            "data": {"path": job["prompts_path"], "max_prompt_len": MAX_PROMPT_LEN, "eval_fraction": 0.0},
            "algo": {"name": "grpo"},
            "kl": {"coef": g["beta"]},
            "reward": {"functions": {"bench.bench_scale:distinct_reward": 1.0}},
            "rollout": {
                "prompts_per_step": g["prompts"],
                "n": g["n"],
                "max_new_tokens": g["new_tokens"],
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 0,
                "eval_prompts": 0,
            },
            "optim": {"lr": g["lr"], "scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0},
            "train": base["train"] | {"batch_size": rows},
        },
    )
    tally, update_s, train_tokens = bench_rl.Tally(g["warmup"], g["steps"]), [], []
    real_step, real_update = online.rl_step, online.update

    def timed_update(*a, **k):
        sync(job)
        t0 = time.perf_counter()
        out = real_update(*a, **k)
        sync(job)
        update_s.append(time.perf_counter() - t0)
        return out

    def timed_step(*a, **k):
        m = real_step(*a, **k)
        sync(job)
        tally.clock.mark()
        tally.completions.append(rows)
        tally.clock.tokens.append(round(m["rollout/response_len"] * rows))
        tally.gen_s.append(m["perf/gen_s"])
        train_tokens.append(m["perf/tokens_per_s"] * m["perf/step_s"])  # prompt + response tokens of the batch
        return m

    online.rl_step, online.update = timed_step, timed_update
    online.train_rl(cfg)
    return grpo_result(job, tally, update_s, train_tokens) | {
        "settings": {
            "train.micro_batch_tokens": cfg.train.micro_batch_tokens,
            "model.dtype": job["dtype"],
            "train.mixed_precision": cfg.train.mixed_precision,
            "rollout.backend": cfg.rollout.backend,
        }
    }


def trl_reward(prompts, completions, **_):
    """bench_scale's distinct-word reward in TRL's ``reward_funcs`` signature."""
    return bench_scale.distinct_reward(prompts, completions)


def prompt_order(job: dict, tok, count: int) -> list[str]:
    """The first ``count`` prompts of alignflow's seeded prompt stream (its rows in its order) as text, checked
    to tokenise to alignflow's ids: TRL samples them in this order (``shuffle_dataset=False``)."""
    from alignflow.config import RLConfig, from_dict
    from alignflow.data.pipeline import prepare_data
    from alignflow.trainers.rl_setup import PromptStream

    cfg = from_dict(
        RLConfig,
        {
            "data": {"path": job["prompts_path"], "eval_fraction": 0.0, "max_prompt_len": MAX_PROMPT_LEN},
            "train": {"seed": 0},
        },
    )
    rows = prepare_data(cfg.data, tok, expect=("prompt",), seed=cfg.train.seed).train
    taken = PromptStream(rows, cfg.train.seed).take(count)
    if tok(text=taken["prompt"])["input_ids"] != [list(i) for i in taken["prompt_token_ids"]]:
        raise RuntimeError("TRL's tokenisation of the prompts differs from alignflow's prompt ids")
    return taken["prompt"]


def trl_grpo_settings(g: dict) -> dict:
    """GRPOConfig keywords of the GRPO workload: 4 micro-batches of a quarter of the completions, one step."""
    settings = {
        "num_generations": g["n"],
        "per_device_train_batch_size": g["prompts"] * g["n"] // 4,
        "gradient_accumulation_steps": 4,
        "max_completion_length": g["new_tokens"],
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "beta": g["beta"],
        "loss_type": "grpo",
        "shuffle_dataset": False,
        "log_completions": False,
    }
    if g["trl_cache"] == "static":
        settings["cache_implementation"] = "static"
    elif g["trl_cache"] == "paged":
        settings["use_transformers_continuous_batching"] = True
    return settings


def instrument_grpo(job: dict, trainer, tally, prep_s: list, train_tokens: list) -> None:
    """Time the trainer's generation (``_generate``: tokenising, ``generate``, decoding) and its whole
    generate-and-score phase; count completions, generated tokens and prompt + response tokens per step."""
    real_generate, real_prepare = trainer._generate, trainer._generate_and_score_completions

    def timed_generate(*a, **k):
        sync(job)
        t0 = time.perf_counter()
        out = real_generate(*a, **k)
        sync(job)
        tally.gen_s.append(time.perf_counter() - t0)
        prompt_ids, completion_ids = out[0], out[1]
        tally.completions.append(len(completion_ids))
        tally.clock.tokens.append(sum(len(c) for c in completion_ids))
        train_tokens.append(sum(len(p) for p in prompt_ids) + tally.clock.tokens[-1])
        return out

    def timed_prepare(*a, **k):  # generation + rewards + reference log-probs: everything but the update
        t0 = time.perf_counter()
        out = real_prepare(*a, **k)
        sync(job)
        prep_s.append(time.perf_counter() - t0)
        return out

    trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_prepare


def grpo_trl(job: dict) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    g = job["grpo"]
    w, n = g["warmup"], g["steps"]
    tok = tokenizer(job)
    ds = Dataset.from_dict({"prompt": prompt_order(job, tok, g["prompts"] * (w + n))})
    settings = trl_grpo_settings(g)
    targs = GRPOConfig(learning_rate=g["lr"], **trl_common(job, GRPOConfig, "grpo", w + n), **settings)
    tally, prep_s, train_tokens = bench_rl.Tally(w, n), [], []
    trainer = GRPOTrainer(
        model=load_hf_model(job),
        reward_funcs=trl_reward,
        args=targs,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[clock_callback(job, tally.clock.mark)],
    )
    instrument_grpo(job, trainer, tally, prep_s, train_tokens)
    trainer.train()
    ends = tally.clock.ends  # step i's update = its wall time - its generation/scoring time (step 0: not timed)
    update_s = [0.0] + [ends[i] - ends[i - 1] - prep_s[i] for i in range(1, len(ends))]
    optim = getattr(targs.optim, "value", str(targs.optim))
    shown = settings | {
        "gradient_checkpointing": False,
        "bf16": targs.bf16,
        "model dtype": job["dtype"],
        "optim": optim,
    }
    return grpo_result(job, tally, update_s, train_tokens) | {"settings": shown}


# ------------------------------------------------------------------------------------------ c. SFT
def rate_result(job: dict, clock, unit_per_step: int, passes: int = 3) -> dict:
    res = clock.result()
    return (
        res
        | {
            "rate": res["tokens_per_s"],
            "units_per_s": unit_per_step * clock.timed / res["seconds"],
            "mfu": mfu(job, res["tokens"], res["seconds"], passes),
        }
        | peak_mem(job)
    )


def sft_alignflow(job: dict) -> dict:
    from alignflow.config import SFTConfig, from_dict
    from alignflow.trainers import loop, sft

    s = job["sft"]
    clock = common.StepClock(s["warmup"], s["steps"])
    real_step, real_opt = sft.train_step, loop.optimizer_step

    def counted_step(*a, **k):
        out = real_step(*a, **k)
        clock.tokens.append(out[1])  # (metrics, real tokens of the step)
        return out

    def timed_opt(*a, **k):
        out = real_opt(*a, **k)
        sync(job)
        clock.mark()
        return out

    sft.train_step, loop.optimizer_step = counted_step, timed_opt
    base = alignflow_common(job, "sft", s["warmup"] + s["steps"])
    cfg = from_dict(
        SFTConfig,
        base
        | {
            "data": {"path": job["sft_path"], "max_len": s["max_len"], "eval_fraction": 0.0, "completion_only": True},
            "optim": {"lr": 1e-5, "scheduler": "constant", "max_grad_norm": 1.0, "weight_decay": 0.0},
            "train": base["train"] | {"batch_size": s["batch"]},
        },
    )
    sft.train_sft(cfg)
    return rate_result(job, clock, s["batch"]) | {
        "settings": {
            "train.packing": cfg.train.packing,
            "data.completion_only": True,
            "model.dtype": job["dtype"],
            "train.micro_batch_tokens": cfg.train.micro_batch_tokens,
        }
    }


def sft_trl(job: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from alignflow.config import SFTConfig as AFSFTConfig

    s, tok = job["sft"], tokenizer(job)
    rows = common.encoded_rows(
        AFSFTConfig, {"path": job["sft_path"], "max_len": s["max_len"], "eval_fraction": 0.0}, tok
    )
    ds = Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "completion_mask": [r["loss_mask"] for r in rows]}
    )
    settings = {"per_device_train_batch_size": s["batch"], "max_length": s["max_len"], "completion_only_loss": True}
    targs = SFTConfig(learning_rate=1e-5, **trl_common(job, SFTConfig, "sft", s["warmup"] + s["steps"]), **settings)
    clock = common.StepClock(s["warmup"], s["steps"])
    trainer = SFTTrainer(
        model=load_hf_model(job),
        args=targs,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[clock_callback(job, clock.mark)],
    )
    clock.count_batches(trainer, 1)
    trainer.train()
    return rate_result(job, clock, s["batch"]) | {
        "settings": settings
        | {
            "padding": "padded to the longest row",
            "gradient_checkpointing": False,
            "bf16": targs.bf16,
            "optim": getattr(targs.optim, "value", str(targs.optim)),
        }
    }


# ------------------------------------------------------------------------------------------ d. DPO
def dpo_alignflow(job: dict) -> dict:
    from alignflow.config import POConfig, from_dict
    from alignflow.trainers import loop, po, po_rows

    d = job["dpo"]
    clock = common.StepClock(d["warmup"], d["steps"])
    real_step, real_opt = po_rows.po_step, loop.optimizer_step

    def counted_step(model, rows, *a, **k):
        clock.tokens.append(sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows))
        return real_step(model, rows, *a, **k)

    def timed_opt(*a, **k):
        out = real_opt(*a, **k)
        sync(job)
        clock.mark()
        return out

    po_rows.po_step, loop.optimizer_step = counted_step, timed_opt
    base = alignflow_common(job, "dpo", d["warmup"] + d["steps"])
    cfg = from_dict(
        POConfig,
        base
        | {
            "data": {
                "path": job["pairs_path"],
                "max_len": d["max_len"],
                "max_prompt_len": d["max_len"],
                "eval_fraction": 0.0,
            },
            "optim": {
                "lr": 1e-6,
                "scheduler": "constant",
                "warmup_ratio": 0.0,
                "max_grad_norm": 1.0,
                "weight_decay": 0.0,
            },
            "loss": {"name": "dpo", "beta": 0.1},
            "ref_cache": False,
            "train": base["train"] | {"batch_size": d["batch"]},
        },
    )
    po.train_po(cfg)
    return rate_result(job, clock, d["batch"]) | {
        "settings": {
            "reference": "log-probs computed once before the timed steps",
            "train.packing": cfg.train.packing,
            "model.dtype": job["dtype"],
            "train.micro_batch_tokens": cfg.train.micro_batch_tokens,
        }
    }


def dpo_trl(job: dict) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alignflow.config import POConfig

    class PreTokenised(DPOTrainer):
        def _prepare_dataset(self, dataset, *_, **__):  # the columns are already TRL's tokenised ones
            return dataset

    d, tok = job["dpo"], tokenizer(job)
    rows = common.encoded_rows(
        POConfig,
        {"path": job["pairs_path"], "max_len": d["max_len"], "max_prompt_len": d["max_len"], "eval_fraction": 0.0},
        tok,
    )
    ds = Dataset.from_dict(
        {
            "prompt_ids": [r["chosen_ids"][: r["prompt_len"]] for r in rows],
            "chosen_ids": [r["chosen_ids"][r["prompt_len"] :] for r in rows],
            "rejected_ids": [r["rejected_ids"][r["prompt_len"] :] for r in rows],
        }
    )
    settings = {
        "per_device_train_batch_size": d["batch"],
        "precompute_ref_log_probs": True,
        "precompute_ref_batch_size": d["batch"],
        "max_length": d["max_len"],
        "beta": 0.1,
        "loss_type": ["sigmoid"],
    }
    targs = DPOConfig(learning_rate=1e-6, **trl_common(job, DPOConfig, "dpo", d["warmup"] + d["steps"]), **settings)
    clock = common.StepClock(d["warmup"], d["steps"])
    trainer = PreTokenised(
        model=load_hf_model(job),
        args=targs,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[clock_callback(job, clock.mark)],
    )
    clock.count_batches(trainer, 1)
    trainer.train()
    return rate_result(job, clock, d["batch"]) | {
        "settings": settings
        | {
            "reference": "precompute_ref_log_probs (before the timed steps)",
            "gradient_checkpointing": False,
            "bf16": targs.bf16,
            "optim": getattr(targs.optim, "value", str(targs.optim)),
        }
    }


def side(workload: str, name: str):
    """The function of a (workload, side) pair."""
    import gpu_gen

    table = {
        "grpo": {"alignflow": grpo_alignflow, "trl": grpo_trl},
        "gen": {"alignflow": gpu_gen.gen_alignflow, "generate": gpu_gen.gen_generate, "vllm": gpu_gen.gen_vllm},
        "sft": {"alignflow": sft_alignflow, "trl": sft_trl},
        "dpo": {"alignflow": dpo_alignflow, "trl": dpo_trl},
    }
    return table[workload][name]
