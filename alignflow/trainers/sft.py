"""Supervised fine-tuning (SFT).

Algorithm: minimise the token-mean negative log-likelihood of the response tokens (``data.completion_only``)
or of all tokens, over optimiser steps of ``train.batch_size`` rows.

    loss(step) = - sum_{rows, t in mask} log pi(y_t | y_<t) / (number of masked tokens in the step)

Exactness: the denominator is the token count of the WHOLE step, so the loss and the gradient do not depend
on how the step is split into micro-batches (``train.micro_batch_tokens``) -- 1 x 8 == 8 x 1, tested.
Padding waste is avoided by packing several rows into one padding-free row (position ids restart, attention
runs per sequence -- ``alignflow.models.varlen`` -- and the first token of every sample is out of the loss) or,
with ``train.packing=false``, by length-sorted token-budget micro-batches.

Run it:  ``alignflow sft --config configs/sft.yaml`` (no paths: trains the built-in ``reviews`` task's model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignflow.config import SFTConfig, TaskConfig, from_dict
from alignflow.data.collate import first_fit_decreasing, flatten, pad_batch, token_budget_groups, unflatten
from alignflow.data.pipeline import prepare_data
from alignflow.distributed.checkpoint import save_checkpoint
from alignflow.distributed.save import save_model
from alignflow.models import load_causal_lm
from alignflow.models.logprobs import masked_nll_sum
from alignflow.models.varlen import supports_varlen
from alignflow.tasks import _source_hash, build_task, get_task
from alignflow.trainers import loop
from alignflow.trainers.run_start import resolve_task, start_run

log = logging.getLogger("alignflow.sft")


@dataclass
class SFTResult:
    model: torch.nn.Module
    tokenizer: object
    losses: list[float] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    output_dir: Path = Path(".")
    tokens_per_s: float = 0.0


def sft_examples(rows: list[dict]) -> list[dict]:
    """Examples with the first token of every sample out of the loss (nothing predicts it)."""
    out = []
    for r in rows:
        mask = list(r["loss_mask"])
        mask[0] = 0
        out.append({"input_ids": list(r["input_ids"]), "loss_mask": mask})
    return out


def micro_batches(examples: list[dict], packing: bool, pack_len: int, budget: int, pad_id: int) -> list[dict]:
    """Split one step's examples into model inputs under the token budget.

    ``packing``: rows bin-packed (first fit decreasing) into packs of at most ``pack_len`` tokens,
    ``budget // pack_len`` packs per micro-batch, each micro-batch ONE padding-free row (``flatten``: no pad
    token, no mask; per-sequence attention). Otherwise length-sorted right-padded groups under the budget.
    """
    if packing:
        bins = first_fit_decreasing([len(e["input_ids"]) for e in examples], pack_len)
        per = max(1, budget // pack_len)  # packs per micro-batch
        return [flatten([examples[i] for b in bins[j : j + per] for i in b]) for j in range(0, len(bins), per)]
    groups = token_budget_groups([len(e["input_ids"]) for e in examples], budget)
    return [pad_batch([examples[i] for i in g], pad_id) for g in groups]


def nll_sum(model, mb: dict, device) -> tuple[torch.Tensor, int]:
    """Sum of -log p over the micro-batch's loss tokens (a float32 scalar), and their count.

    A padding-free row goes through the varlen attention, or is re-padded for a model that lacks it. A
    right-padded batch runs WITHOUT its mask: under causal attention a real token never sees the padding
    after it, and padded positions are out of the loss, so the sum is the same and sdpa takes its causal path.
    """
    if "seq_lens" in mb and not supports_varlen(model):
        mb = unflatten(mb, pad_id=0)  # the pad id is never attended to nor in the loss
    mask = mb["loss_mask"]
    attn, pos = mb.get("attention_mask"), mb.get("position_ids")
    if attn is not None and attn.dim() == 2 and bool((attn[:, 1:] <= attn[:, :-1]).all()):
        attn, pos = None, None  # right padding only: positions 0..n-1 of every row are its real tokens
    s = masked_nll_sum(
        model,
        mb["input_ids"].to(device),
        mask.to(device),
        attention_mask=None if attn is None else attn.to(device),
        position_ids=None if pos is None else pos.to(device),
        seq_lens=mb.get("seq_lens"),
    )
    return s, int(mask.sum())  # the count is taken on the host: no device sync


@torch.no_grad()
def evaluate_nll(model, examples: list[dict], cfg: SFTConfig, pad_id: int, device) -> dict:
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for mb in micro_batches(
        sft_examples(examples), cfg.train.packing, cfg.data.max_len, cfg.train.micro_batch_tokens, pad_id
    ):
        s, n = nll_sum(model, mb, device)
        total, count = total + s.item(), count + n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/perplexity": float(torch.tensor(loss).exp())}


def train_step(model, examples: list[dict], cfg: SFTConfig, pad_id: int, device) -> tuple[dict, int]:
    """Forward/backward one optimiser step's rows; gradients are left in ``.grad``. Returns metrics, tokens.

    Non-finite losses are detected once, after the step (one host sync per step, not per micro-batch); the
    caller's guard then drops the step's gradients.
    """
    n_loss = sum(sum(e["loss_mask"]) for e in examples)
    total = torch.zeros((), device=device)
    for mb in micro_batches(examples, cfg.train.packing, cfg.data.max_len, cfg.train.micro_batch_tokens, pad_id):
        with loop.autocast(device, cfg.train.mixed_precision):
            s, _ = nll_sum(model, mb, device)
        loss = s / max(n_loss, 1)  # token mean over the whole step, whatever the split
        loss.backward()
        total += loss.detach()
    if not torch.isfinite(total):
        return {"loss": float("nan")}, 0
    return {"loss": total.item()}, sum(len(e["input_ids"]) for e in examples)


def train_sft(cfg: SFTConfig, step_fn=None) -> SFTResult:
    """Run SFT as configured; returns the trained model and the per-step losses. ``step_fn`` replaces
    :func:`train_step` (same signature): another objective on the same data and loop (IFT, trainers/ift.py)."""
    named = cfg.model.name_or_path == BUILTIN_SFT  # fine-tune the built-in SFT model further (configs/judge_sft.yaml)
    resolve_task(cfg, "sft", build=named)  # with its task's files: data.path may name them
    resolve_model(cfg)  # builtin:sft: the task's SFT model, built on first use
    out, device, tokenizer = start_run(cfg)
    data = prepare_data(cfg.data, tokenizer, expect=("lm", "prompt_completion"), seed=cfg.train.seed)
    model = load_causal_lm(cfg.model, device)
    model.train()
    train = sft_examples(data.train)
    run = loop.open_loop(model, len(train), cfg.optim, cfg.train, out, cfg.train.seed, data.reports)
    sampler, total, opt, sched, start, logger = run.sampler, run.total, run.opt, run.sched, run.start, run.logger
    bar = loop.Progress(total, start, cfg.train.progress, "sft")
    result = SFTResult(model, tokenizer, output_dir=out)
    pad_id = tokenizer.pad_token_id
    for step in range(start, total):
        t0 = time.perf_counter()
        metrics, ntok = (step_fn or train_step)(model, [train[i] for i in sampler.rows(step)], cfg, pad_id, device)
        if loop.guard_loss(step, cfg.train, {"nll": torch.tensor(metrics["loss"])}):
            metrics["grad_norm"], _ = loop.optimizer_step(model, opt, sched, cfg.train, cfg.optim.max_grad_norm, step)
        else:
            opt.zero_grad(set_to_none=True)
        metrics |= {"lr": sched.get_last_lr()[0], "perf/tokens_per_s": ntok / (time.perf_counter() - t0)}
        result.losses.append(metrics["loss"])
        result.tokens_per_s = bar.update(ntok, loss=metrics["loss"])
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total:
            logger.log(step + 1, {f"train/{k}" if "/" not in k else k: v for k, v in metrics.items()})
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            logger.log(step + 1, evaluate_nll(model, data.eval, cfg, pad_id, device))
        loop.checkpoint_step(
            step + 1,
            total,
            cfg.train,
            out,
            lambda path, done=step + 1: save_checkpoint(path, model, opt, sched, {"step": done}),
        )
    bar.close()
    result.eval = evaluate_nll(model, data.eval, cfg, pad_id, device)
    logger.log(total, result.eval)
    logger.close()
    save_model(model, tokenizer, out / "model")
    return result


# ------------------------------------------------------------------------------------------------ builtin:sft
# ``model.name_or_path: builtin:sft``: the built-in task's tiny model after supervised fine-tuning, built on first
# use (module docstring of alignflow.trainers.builtin_sft).
BUILTIN_SFT = "builtin:sft"
DONE = "builtin_sft.json"


def sft_settings(task: TaskConfig) -> dict:
    """Steps, learning rate, batch size and max length of the built-in SFT of ``task``."""
    spec = get_task(task.name)
    return {"steps": task.sft_steps or spec.sft_steps, "lr": spec.sft_lr, "batch_size": 32, "max_len": 128}


def _key(task: TaskConfig, settings: dict, seed: int) -> str:
    conf = {k: v for k, v in dataclasses.asdict(task).items() if k != "sft_steps"}
    blob = json.dumps([conf, settings, seed, _source_hash(get_task(task.name))], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def builtin_sft_model(
    task: TaskConfig, output_dir: str | Path, seed: int = 0, device: str = "auto", progress: bool = True
) -> Path:
    """The model directory of the built-in SFT model for ``task`` (trained now when not cached)."""
    settings = sft_settings(task)
    root = Path(output_dir).resolve().parent / "builtin-sft"
    out = root / f"{task.name}-{_key(task, settings, seed)}"
    if (out / DONE).is_file() and (out / "model").is_dir():
        return out / "model"
    if out.exists():  # an SFT that did not finish: start it again
        shutil.rmtree(out)
    art = build_task(task.name, task, root / f"task-{task.name}-{_key(task, {}, 0)}")
    log.info(
        "model.name_or_path=%s: SFT of the '%s' task's tiny model for %d steps into %s",
        BUILTIN_SFT,
        task.name,
        settings["steps"],
        out,
    )
    train_sft(
        from_dict(
            SFTConfig,
            {
                "model": {"name_or_path": str(art.model_dir), "tokenizer": str(art.tokenizer_dir)},
                "data": {"path": str(art.sft_path), "max_len": settings["max_len"], "eval_fraction": 0.0},
                "optim": {"lr": settings["lr"], "warmup_ratio": 0.05},
                "train": {
                    "output_dir": str(out),
                    "batch_size": settings["batch_size"],
                    "max_steps": settings["steps"],
                    "seed": seed,
                    "device": device,
                    "progress": progress,
                    "report_to": [],
                },
            },
        )
    )
    (out / DONE).write_text(json.dumps({"task": dataclasses.asdict(task), **settings, "seed": seed}, indent=1) + "\n")
    return out / "model"


def resolve_model(cfg) -> None:
    """Replace ``model.name_or_path: builtin:sft`` of a training config by the built model's directory (in place)."""
    if cfg.model.name_or_path != BUILTIN_SFT:
        return
    cfg.model.name_or_path = str(
        builtin_sft_model(cfg.task, cfg.train.output_dir, cfg.train.seed, cfg.train.device, cfg.train.progress)
    )
