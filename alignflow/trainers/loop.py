"""Pieces every training loop uses: device and precision, optimiser and schedule, the data order,
the optimiser step with its non-finite guard, metrics logging and the progress bar.

These are plain functions and small classes; the trainers call them from loops that read top to bottom.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignflow.config import ConfigError, OptimConfig, TrainConfig
from alignflow.distributed.checkpoint import latest_checkpoint, load_checkpoint
from alignflow.trainers.run_dir import (
    arm_interrupt,
    checkpoint_step,  # noqa: F401 -- the trainers' save hook, as loop.checkpoint_step
    disarm_interrupt,
)
from alignflow.trainers.trackers import open_trackers

log = logging.getLogger("alignflow")


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the message names the step and the term."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_micro_batch_tokens(device: torch.device) -> int:
    """``train.micro_batch_tokens=0``: 8192 tokens per forward/backward on a CPU (cache-sized pieces), 16384 on a
    GPU (enough rows to fill it at the 0.5B scale; at a 150k vocabulary the LM head's fp32 logits of ~12k response
    positions fit ``models.logprobs.logits_budget`` of an H200 without recompute, and are chunked on smaller cards)."""
    return 16384 if torch.device(device).type == "cuda" else 8192


def autocast(device: torch.device, mode: str):
    """Autocast context for ``train.mixed_precision`` (auto = bf16 on a CUDA device that supports it)."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if mode == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; biases and norm weights (1-D) get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one launch for every parameter) where all parameters are plain CUDA tensors; FSDP2's
    # DTensors and CPU tensors take the default (foreach) implementation.
    params = decay + no_decay
    fused = bool(params) and all(type(p) is torch.nn.Parameter and p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        **({"fused": True} if fused else {}),
    )


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then constant / linear / cosine down to min_lr_ratio."""
    warm = int(cfg.warmup_ratio * total)
    if step < warm:
        return (step + 1) / warm
    if cfg.scheduler == "constant" or total <= warm:
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    shape = 1 - progress if cfg.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))


class StepSampler:
    """Which rows each optimiser step reads: epochs are seeded permutations laid end to end.

    Step ``s`` reads global positions ``s*B .. s*B+B-1`` of that stream, so the data position of a run is
    just its step count: resuming at step ``s`` reads exactly what the uninterrupted run would have read.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        if num_rows == 0:
            raise ValueError("no training rows")
        self.n, self.bs, self.seed = num_rows, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def rows(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.bs, (step + 1) * self.bs):
            out.append(self._perm(pos // self.n)[pos % self.n])
        return out

    def total_steps(self, cfg: TrainConfig) -> int:
        return cfg.max_steps or max(1, math.ceil(cfg.epochs * self.n / self.bs))


def check_finite(step: int, terms: dict[str, torch.Tensor]) -> str | None:
    """Name of the first non-finite term, or None."""
    for name, value in terms.items():
        if value is not None and not torch.isfinite(value).all():
            return name
    return None


def optimizer_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, sched, cfg: TrainConfig, max_grad_norm: float, step: int
) -> tuple[float, bool]:
    """Clip, guard against non-finite gradients, step. Returns (grad_norm, stepped)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the norm over every rank's shards
        norm = norm.full_tensor()
    if not torch.isfinite(norm):
        bad = next(
            (n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()), "?"
        )
        opt.zero_grad(set_to_none=True)
        if cfg.on_nonfinite == "error":
            raise NonFiniteError(
                f"step {step}: non-finite gradient (first in parameter '{bad}'); "
                f"set train.on_nonfinite=skip to skip such steps"
            )
        return float("nan"), False
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm.item(), True


def guard_loss(step: int, cfg: TrainConfig, terms: dict[str, torch.Tensor]) -> bool:
    """Return True when the step may go on; raise (or return False to skip) on a non-finite loss term."""
    bad = check_finite(step, terms)
    if bad is None:
        return True
    if cfg.on_nonfinite == "error":
        raise NonFiniteError(f"step {step}: loss term '{bad}' is not finite; set train.on_nonfinite=skip to skip")
    return False


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl``; mirrors it to the trackers of
    ``train.report_to`` (``alignflow.trainers.trackers``; default TensorBoard when installed).

    A new run (``resume`` false, ``start`` 0) starts the file afresh; ``resume`` appends; a run resumed at step
    ``start`` > 0 first drops the rows logged after that step (the steps it does again), see :meth:`rewind`."""

    def __init__(self, output_dir: str | Path, resume: bool = False, start: int = 0, report_to: list | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if start > 0:
            self.rewind(start)
        elif not resume:
            self.path.write_text("")
        self._trackers = open_trackers(self.dir, resume=resume or start > 0, report_to=report_to)

    def log(self, step: int, metrics: dict) -> None:
        row = {
            "step": step,
            **{k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in metrics.items()},
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, float) and k != "step"}
        for tracker in self._trackers if scalars else ():
            tracker.log(step, scalars)

    def rewind(self, step: int) -> None:
        """Keep only the rows up to ``step`` (a resume from the checkpoint of ``step`` does the later ones again)."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and _row_step(line) <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf  # a torn last line of a killed run: dropped


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Every command's progress bar reads "<label> step n/total |bar| [elapsed<remaining, loss=..., tok/s=...]"; the
# label is the command, then what it runs: sft, rm/bt, rm/bt/member-1, pm, rl/grpo, po/dpo, online_po/inpo,
# superhf, alol/seq, mpo/dpo then mpo/ppo, eval (one unit per policy evaluated).
BAR_COMMANDS = (
    *("sft", "ift", "rm", "pm", "rl", "po", "online_po", "superhf", "alol", "mpo", "eval", "vpl", "refuel"),
    "cgpo",
    "qdhf",
)
BAR_FORMAT = "{desc} {unit} {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}{postfix}]"


def bar_label(command: str, *detail: str) -> str:
    """A progress bar's label: ``command`` (one of :data:`BAR_COMMANDS`) then each non-empty ``detail``, joined
    by ``/``: ``bar_label("rl", "grpo") == "rl/grpo"``."""
    if command not in BAR_COMMANDS:
        raise ValueError(f"progress bar label: {command!r} is not one of {', '.join(BAR_COMMANDS)}")
    return "/".join([command, *(d for d in detail if d)])


_OUTER: list = []  # commands whose stages are other commands' trainers (bar_command)


def bar_command(command: str):
    """Decorator for a command that runs other commands' trainers as its stages (``mpo`` runs ``po`` then ``rl``):
    their bars take its name, ``mpo/dpo`` then ``mpo/ppo``."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            _OUTER.append(bar_label(command))
            try:
                return fn(*args, **kwargs)
            finally:
                _OUTER.pop()

        return run

    return wrap


class Progress:
    """tqdm bar showing step n/total, loss and throughput under a :func:`bar_label` label; ETA comes from tqdm.

    ``enabled=None`` shows the bar only on a terminal; ``interrupt=False`` leaves Ctrl-C alone (loops that
    write no checkpoint, such as evaluation)."""

    def __init__(
        self, total: int, initial: int, enabled: bool | None, desc: str, unit: str = "step", interrupt: bool = True
    ):
        if desc != bar_label(*desc.split("/")):
            raise ValueError(f"progress bar label {desc!r}: build it with bar_label()")
        if _OUTER:  # a stage of another command (bar_command)
            desc = bar_label(_OUTER[-1], *desc.split("/")[1:])
        self.label = desc
        if initial > total:  # resumed from a checkpoint past the configured end: nothing would be trained
            raise ConfigError(
                f"the checkpoint resumed from is at step {initial}, past this run's last step {total} "
                f"(train.max_steps / train.epochs); raise it to train on, or use a new train.output_dir"
            )
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=None if enabled is None else not enabled,
            desc=desc,
            unit=unit,
            bar_format=BAR_FORMAT,
            dynamic_ncols=True,
        )
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.interrupt = interrupt
        if interrupt:
            arm_interrupt(self)  # while the bar is open, Ctrl-C ends the step in flight and checkpoints (run_dir)

    def update(self, tokens: int, **postfix) -> float:
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.t0)
        shown = {k: f"{v:.4g}" for k, v in postfix.items()}
        self.bar.set_postfix(shown | ({"tok/s": f"{rate:.0f}"} if tokens else {}))
        self.bar.update(1)
        return rate

    def close(self) -> None:
        self.bar.close()
        if self.interrupt:
            disarm_interrupt(self)


def batched(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclasses.dataclass
class TrainingLoop:
    """What a supervised-style trainer opens with: the seeded row sampler, the optimiser and scheduler, the step
    to start from (restored from the newest checkpoint under ``train.resume``) and the metrics logger."""

    sampler: StepSampler
    total: int
    opt: torch.optim.Optimizer
    sched: object
    start: int
    logger: MetricsLogger


def open_loop(
    model: torch.nn.Module,
    num_rows: int,
    optim: OptimConfig,
    train: TrainConfig,
    out: Path,
    seed: int,
    reports: Iterable = (),
) -> TrainingLoop:
    """Sampler over ``num_rows`` rows, optimiser, scheduler, resume and logger (the data ``reports`` logged at the
    start step). Shared by the SFT, reward-model and preference trainers."""
    sampler = StepSampler(num_rows, train.batch_size, seed)
    total = sampler.total_steps(train)
    opt = build_optimizer(model, optim)
    sched = build_scheduler(opt, optim, total)
    start = int(resume(out, train.resume, lambda ckpt: load_checkpoint(ckpt, model, opt, sched)).get("step", 0))
    logger = MetricsLogger(out, start=start)
    for r in reports:
        logger.log(start, {"data/report": r})
    return TrainingLoop(sampler, total, opt, sched, start, logger)


def resume(out: Path, enabled: bool, load: Callable[[Path], dict]) -> dict:
    """The one resume skeleton: when ``enabled`` (``train.resume``; online RL's recovery after a lost worker
    always), hand the newest checkpoint of ``out`` to the trainer's ``load`` (which restores its models, optimisers
    and RNG and returns the saved state, with ``step``) and return that state; ``{}`` when not resuming or when
    there is no checkpoint yet. Every trainer resumes through it."""
    ckpt = latest_checkpoint(out) if enabled else None
    if ckpt is None:
        return {}
    state = load(ckpt)
    log.info("resumed from %s at step %s", ckpt, state.get("step"))
    return state
