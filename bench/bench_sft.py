"""SFT training throughput: alignflow ``train_sft`` vs TRL ``SFTTrainer`` on the identical workload.

Workload (see ``bench/common.py``): tiny Llama (hidden 256, 4 layers, 4 heads, MLP 1024, the reviews vocabulary),
prompt-completion rows of 16-256 tokens (uniform), completion-only loss, 32 rows per optimiser step, AdamW
lr 1e-4 constant, grad-norm clip 1.0, fp32, the same number of torch threads, 2 warm-up steps, then ``--steps``
timed steps. tokens/s counts real (non-pad) tokens.

TRL settings (``--mode`` of the TRL side; ``--sweep`` times them all once and keeps the fastest):

* ``padded``          defaults: random batches of 32 rows padded to the longest row.
* ``group_by_length`` ``train_sampling_strategy="group_by_length"``: batches of similar lengths (changes which
                      rows share a step, so it is not the same algorithm; listed because it is TRL's padding fix).
* ``rebalance``       ``train_sampling_strategy="batch_rebalance"``, 4 x 8 gradient accumulation: the same 32
                      rows per step, length-sorted micro-batches (TRL's equivalent of alignflow's padded mode).
* ``padding_free``    ``padding_free=True``: the 32 rows flattened into one row; transformers builds the
                      block-diagonal mask from the restarting ``position_ids`` (sdpa; no flash-attention on CPU).
* ``packing_bfd``     ``packing=True, packing_strategy="bfd"`` (max_length 256; implies padding-free), with
                      ``round(32 * mean_len / 256)`` packs per step so that a step holds as many tokens.

All TRL runs: ``activation_checkpointing=False`` and ``bf16=False`` (TRL defaults to True for both), no
logging/saving/eval, ``dataloader_num_workers=0``, the default optimiser (``adamw_torch_fused``).

    python bench/bench_sft.py [--steps 20] [--repeats 2] [--sweep]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TRL_MODES = ("padded", "group_by_length", "rebalance", "padding_free", "packing_bfd")
ALIGNFLOW_MODES = ("packed", "padded")
NAME, UNIT = "sft", "rows"
PACK_LEN = 256
MAX_LEN_DATA = 256  # every row fits: no truncation on either side


def alignflow_side(args, wl: dict, mode: str) -> dict:
    from alignflow.config import SFTConfig, from_dict
    from alignflow.trainers import loop, sft

    clock = common.StepClock(args.warmup, args.steps)
    real_step, real_opt = sft.train_step, loop.optimizer_step

    def counted_step(model, examples, *a, **k):
        clock.tokens.append(sum(len(e["input_ids"]) for e in examples))
        return real_step(model, examples, *a, **k)

    def timed_opt(*a, **k):
        out = real_opt(*a, **k)
        clock.mark()
        return out

    sft.train_step, loop.optimizer_step = counted_step, timed_opt
    cfg = from_dict(
        SFTConfig,
        {
            "model": {"name_or_path": wl["model_dir"], "tokenizer": wl["tokenizer_dir"]},
            "data": {"path": wl["sft_path"], "max_len": MAX_LEN_DATA, "eval_fraction": 0.0, "completion_only": True},
            "optim": {"lr": 1e-4, "scheduler": "constant", "max_grad_norm": 1.0, "weight_decay": 0.0},
            "train": {
                "overwrite": True,
                "output_dir": str(Path(args.work) / "alignflow-sft"),
                "batch_size": args.batch,
                "max_steps": args.warmup + args.steps,
                "progress": False,
                "log_every": 10**6,
                "mixed_precision": "none",
                "device": "cpu",
                "num_threads": args.threads,
                "seed": 0,
                "packing": mode == "packed",
            },
        },
    )
    sft.train_sft(cfg)
    return clock.result() | {
        "settings": {
            "train.packing": mode == "packed",
            "data.completion_only": True,
            "train.micro_batch_tokens": cfg.train.micro_batch_tokens,
            "data.max_len": MAX_LEN_DATA,
        }
    }


def _trl_dataset(wl: dict):
    """alignflow's token ids as TRL's pre-tokenised columns (``input_ids``, ``completion_mask``)."""
    from datasets import Dataset

    from alignflow.config import SFTConfig
    from alignflow.models import load_tokenizer

    tok = load_tokenizer(wl["tokenizer_dir"])
    rows = common.encoded_rows(SFTConfig, {"path": wl["sft_path"], "max_len": MAX_LEN_DATA, "eval_fraction": 0.0}, tok)
    return tok, Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "completion_mask": [r["loss_mask"] for r in rows]}
    )


def trl_settings(mode: str, batch: int, mean_len: float) -> dict:
    """SFTConfig keyword arguments of a TRL mode (everything that differs from the shared ones)."""
    if mode == "padded":
        return {"per_device_train_batch_size": batch}
    if mode == "group_by_length":
        return {"per_device_train_batch_size": batch, "train_sampling_strategy": "group_by_length"}
    if mode == "rebalance":
        return {
            "per_device_train_batch_size": batch // 4,
            "gradient_accumulation_steps": 4,
            "train_sampling_strategy": "batch_rebalance",
        }
    if mode == "padding_free":
        return {"per_device_train_batch_size": batch, "padding_free": True, "max_length": None}
    if mode == "packing_bfd":
        packs = max(1, round(batch * mean_len / PACK_LEN))
        return {
            "per_device_train_batch_size": packs,
            "packing": True,
            "packing_strategy": "bfd",
            "max_length": PACK_LEN,
        }
    raise ValueError(f"unknown TRL mode {mode!r}; choose from {', '.join(TRL_MODES)}")


def trl_side(args, wl: dict, mode: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok, ds = _trl_dataset(wl)
    mean_len = statistics.mean(len(x) for x in ds["input_ids"])
    clock = common.StepClock(args.warmup, args.steps)
    settings = {"max_length": MAX_LEN_DATA, **trl_settings(mode, args.batch, mean_len)}
    accum = settings.get("gradient_accumulation_steps", 1)
    targs = SFTConfig(
        output_dir=str(Path(args.work) / f"trl-sft-{mode}"),
        max_steps=args.warmup + args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        activation_checkpointing=False,
        completion_only_loss=True,
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
        def on_step_end(self, *_, **__):
            clock.mark()

    trainer = SFTTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    clock.count_batches(trainer, accum)
    trainer.train()
    shown = settings | {
        "activation_checkpointing": False,
        "bf16": False,
        "completion_only_loss": True,
        "optim": getattr(targs.optim, "value", str(targs.optim)),
    }
    return clock.result() | {"settings": shown}


if __name__ == "__main__":
    common.bench_main(sys.modules[__name__])
