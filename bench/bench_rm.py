"""Reward-model training throughput: alignflow ``train_rm`` vs TRL ``RewardTrainer`` on the identical workload.

Workload (see ``bench/common.py``): the tiny Llama of the SFT bench as a sequence classifier (one score),
preference pairs whose chosen and rejected sequences are each 16-256 tokens (uniform, independent),
Bradley-Terry loss, 32 pairs per optimiser step, AdamW lr 1e-4 constant, grad-norm clip 1.0, fp32, the same
number of torch threads, 2 warm-up steps, then ``--steps`` timed steps. tokens/s counts real (non-pad) tokens
of chosen and rejected sequences.

TRL settings (``RewardTrainer`` has no packing / padding-free option; ``--sweep`` times these and keeps the
fastest):

* ``padded``          defaults: 32 pairs -> one batch of 64 rows (chosen then rejected) padded to the longest.
* ``group_by_length`` ``train_sampling_strategy="group_by_length"`` on a ``length`` column (the longer of the
                      pair; ``remove_unused_columns=False`` so the sampler sees it): steps of similar lengths
                      (changes which pairs share a step).
* ``rebalance``       ``train_sampling_strategy="batch_rebalance"``, 4 x 8 gradient accumulation: the same 32
                      pairs per step in length-balanced micro-batches.

All TRL runs: ``activation_checkpointing=False`` and ``bf16=False`` (TRL defaults to True for both), no
logging/saving/eval, ``dataloader_num_workers=0``, the default optimiser.

    python bench/bench_rm.py [--steps 20] [--repeats 2] [--sweep]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TRL_MODES = ("padded", "group_by_length", "rebalance")
ALIGNFLOW_MODES = ("packed", "padded")
NAME, UNIT = "rm", "pairs"
MAX_LEN_DATA = 256  # every sequence fits: no truncation on either side


def alignflow_side(args, wl: dict, mode: str) -> dict:
    from alignflow.config import RMConfig, from_dict
    from alignflow.trainers import loop
    from alignflow.trainers import rm as reward

    clock = common.StepClock(args.warmup, args.steps)
    real_step, real_opt = reward.STEPS["bt"], loop.optimizer_step

    def counted_step(model, pairs, *a, **k):
        clock.tokens.append(sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs))
        return real_step(model, pairs, *a, **k)

    def timed_opt(*a, **k):
        out = real_opt(*a, **k)
        clock.mark()
        return out

    reward.STEPS["bt"], loop.optimizer_step = counted_step, timed_opt
    cfg = from_dict(
        RMConfig,
        {
            "model": {"name_or_path": wl["model_dir"], "tokenizer": wl["tokenizer_dir"]},
            "data": {"path": wl["pairs_path"], "max_len": MAX_LEN_DATA, "eval_fraction": 0.0},
            "optim": {"lr": 1e-4, "scheduler": "constant", "max_grad_norm": 1.0, "weight_decay": 0.0},
            "reward": {"loss": "bt"},
            "train": {
                "overwrite": True,
                "output_dir": str(Path(args.work) / "alignflow-rm"),
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
    reward.train_rm(cfg)
    return clock.result() | {
        "settings": {
            "train.packing": mode == "packed",
            "reward.loss": "bt",
            "train.micro_batch_tokens": cfg.train.micro_batch_tokens,
        }
    }


def _trl_dataset(wl: dict, with_length: bool):
    """alignflow's token ids as TRL's pre-tokenised columns (``chosen_ids``, ``rejected_ids``)."""
    from datasets import Dataset

    from alignflow.config import RMConfig
    from alignflow.models import load_tokenizer

    tok = load_tokenizer(wl["tokenizer_dir"])
    rows = common.encoded_rows(RMConfig, {"path": wl["pairs_path"], "max_len": MAX_LEN_DATA, "eval_fraction": 0.0}, tok)
    cols = {"chosen_ids": [r["chosen_ids"] for r in rows], "rejected_ids": [r["rejected_ids"] for r in rows]}
    if with_length:
        cols["length"] = [max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    return tok, Dataset.from_dict(cols)


def trl_settings(mode: str, batch: int) -> dict:
    """RewardConfig keyword arguments of a TRL mode."""
    if mode == "padded":
        return {"per_device_train_batch_size": batch}
    if mode == "group_by_length":
        return {
            "per_device_train_batch_size": batch,
            "train_sampling_strategy": "group_by_length",
            "remove_unused_columns": False,
        }
    if mode == "rebalance":
        return {
            "per_device_train_batch_size": batch // 4,
            "gradient_accumulation_steps": 4,
            "train_sampling_strategy": "batch_rebalance",
            "remove_unused_columns": False,
        }
    raise ValueError(f"unknown TRL mode {mode!r}; choose from {', '.join(TRL_MODES)}")


def trl_side(args, wl: dict, mode: str) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    settings = trl_settings(mode, args.batch)
    tok, ds = _trl_dataset(wl, with_length=mode != "padded")
    clock = common.StepClock(args.warmup, args.steps)
    accum = settings.get("gradient_accumulation_steps", 1)
    targs = RewardConfig(
        output_dir=str(Path(args.work) / f"trl-rm-{mode}"),
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
        max_length=MAX_LEN_DATA,
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
    model = AutoModelForSequenceClassification.from_pretrained(wl["model_dir"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.mark()

    trainer = RewardTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    clock.count_batches(trainer, accum)
    trainer.train()
    shown = settings | {
        "activation_checkpointing": False,
        "bf16": False,
        "optim": getattr(targs.optim, "value", str(targs.optim)),
    }
    return clock.result() | {"settings": shown}


if __name__ == "__main__":
    common.bench_main(sys.modules[__name__])
