"""Filling in what the user left empty: the shared built-in SFT model (``model.name_or_path: builtin:sft``), then
the built-in task's model, tokenizer and data (:mod:`alignflow.trainers.run_start`)."""

from __future__ import annotations

from alignflow.trainers.builtin_sft import resolve_model
from alignflow.trainers.run_dir import prepare_run_dir
from alignflow.trainers.run_start import TASK_DATA, resolve_task, start_run, task_gold

__all__ = ["TASK_DATA", "resolve_builtin", "start_run", "task_gold"]


def resolve_builtin(cfg, command: str):
    """Build the built-in task (``cfg.task``) when ``model.name_or_path`` or ``data.path`` is empty, and the
    ``builtin:sft`` model when it is named.

    Returns the task artefacts (or None when the user gave both paths). Mutates ``cfg`` in place so the
    saved run config records the paths that were actually used.
    """
    prepare_run_dir(cfg.train, check_only=True)  # refused before the built-in task or SFT model is made
    resolve_model(cfg)  # model.name_or_path=builtin:sft: the task's SFT model, built on first use
    return resolve_task(cfg, command)
