"""Filling in what the user left empty: the built-in task's model, tokenizer and data."""

from __future__ import annotations

import logging
from pathlib import Path

from alignflow.models.device import resolve_device

log = logging.getLogger("alignflow")

# Which of the task's files each command trains on when data.path is empty.
TASK_DATA = {"sft": "sft_path", "rm": "pairs_path", "po": "pairs_path", "rl": "prompts_path"}


def resolve_builtin(cfg, command: str):
    """Build the built-in task (``cfg.task``) when ``model.name_or_path`` or ``data.path`` is empty.

    Returns the task artefacts (or None when the user gave both paths). Mutates ``cfg`` in place so the
    saved run config records the paths that were actually used.
    """
    from alignflow.tasks.builtin_sft import resolve_model
    from alignflow.trainers.run_dir import prepare_run_dir

    prepare_run_dir(cfg.train, check_only=True)  # refused before the built-in task or SFT model is made
    resolve_model(cfg)  # model.name_or_path=builtin:sft: the task's SFT model, built on first use
    if cfg.model.name_or_path and cfg.data.path:
        return None
    from alignflow.tasks import build_task

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
    import json

    import torch

    from alignflow.config import to_dict
    from alignflow.models import load_tokenizer
    from alignflow.trainers import loop
    from alignflow.trainers.run_dir import prepare_run_dir

    out = prepare_run_dir(cfg.train)  # refuses to replace an earlier run's results unless told to
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    if seed:
        loop.set_seed(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    if not cfg.train.micro_batch_tokens:  # 0: a budget for the device (config.json keeps the 0 the user gave)
        cfg.train.micro_batch_tokens = loop.default_micro_batch_tokens(device)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.revision,
                               cfg.model.trust_remote_code)
    return out, device, tokenizer
