"""The opening every trainer shares: the run directory, seeds, device and tokenizer (:func:`start_run`), and the
built-in task's model and data when the user left the paths empty (:func:`resolve_task`). The SFT trainer uses
this module directly; the others go through :mod:`alignflow.trainers.setup`, which also builds the shared
``builtin:sft`` model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from alignflow.config import to_dict
from alignflow.models import load_tokenizer
from alignflow.models.device import resolve_device
from alignflow.tasks import build_task, get_task
from alignflow.trainers import loop
from alignflow.trainers.run_dir import prepare_run_dir

log = logging.getLogger("alignflow")

# Which of the task's files each command trains on when data.path is empty.
TASK_DATA = {"sft": "sft_path", "rm": "pairs_path", "po": "pairs_path", "rl": "prompts_path"}


def resolve_task(cfg, command: str, build: bool = False):
    """Build the built-in task (``cfg.task``) when ``model.name_or_path`` or ``data.path`` is empty (the SFT
    command's part of :func:`alignflow.trainers.setup.resolve_builtin`: no ``builtin:sft`` model).

    ``build``: build it even when both are given (the files of a task whose SFT model was named: a data path
    may point into it). Returns the task artefacts (or None when the user gave both paths and no ``build``).
    Mutates ``cfg`` in place so the saved run config records the paths that were actually used.
    """
    prepare_run_dir(cfg.train, check_only=True)  # refused before the built-in task is made
    if cfg.model.name_or_path and cfg.data.path and not build:
        return None
    art = build_task(cfg.task.name, cfg.task, Path(cfg.train.output_dir) / "task")
    if not cfg.model.name_or_path:
        cfg.model.name_or_path = str(art.model_dir)
        cfg.model.tokenizer = cfg.model.tokenizer or str(art.tokenizer_dir)
        log.info("using the built-in '%s' task's tiny model at %s", cfg.task.name, art.model_dir)
    if not cfg.data.path:
        rated = command == "rm" and (cfg.data.format == "rated" or cfg.reward.loss == "regression")
        cfg.data.path = str(art.rated_path if rated else getattr(art, TASK_DATA[command]))
        log.info("using the built-in '%s' task's data at %s", cfg.task.name, cfg.data.path)
    return art


def start_run(cfg, seed: bool = True):
    """The opening every trainer shares: run directory with its config.json, (seed), CPU threads, device and
    tokenizer. Returns ``(output_dir, device, tokenizer)``. The run directory is checked first
    (:func:`alignflow.trainers.run_dir.prepare_run_dir`). ``seed=False`` leaves seeding to the caller (the
    reward trainer seeds each ensemble member itself)."""
    out = prepare_run_dir(cfg.train)  # refuses to replace an earlier run's results unless told to
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    if seed:
        loop.set_seed(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    if not cfg.train.micro_batch_tokens:  # 0: a budget for the device (config.json keeps the 0 the user gave)
        cfg.train.micro_batch_tokens = loop.default_micro_batch_tokens(device)
    tokenizer = load_tokenizer(
        cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code
    )
    return out, device, tokenizer


def task_gold(cfg, art):
    """The built-in task's gold reward when the run uses the task's prompts or rewards (``art`` from
    :func:`resolve_task`, or ``reward.task`` set), else None: what the online trainers report as ``eval/gold``."""
    if art is not None:
        return art.gold_reward
    return get_task(cfg.task.name).gold_reward if cfg.reward.task else None
