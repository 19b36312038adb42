"""``model.name_or_path: builtin:sft``: the built-in task's tiny model after supervised fine-tuning, built on first use.

Presets whose method starts from an SFT policy (PPO, GRPO, SuperHF, A-LoL, online DPO, ...) name this model, so
they run as written on a fresh clone: the first run fine-tunes the task's tiny model on the task's SFT corpus
(``task.sft_steps`` steps, default the task's own ``TaskSpec.sft_steps``) and caches it beside the run directory,
in ``<parent of train.output_dir>/builtin-sft/<task>-<key>/model`` (``runs/builtin-sft/...`` for the presets), so
that every preset of the same task and seed shares one SFT model. The key hashes everything the SFT depends on
(the task config, steps, learning rate, seed, the code of the task); a different key builds a new model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

from alignflow.config import SFTConfig, TaskConfig, from_dict
from alignflow.tasks import _source_hash, build_task, get_task
from alignflow.trainers.sft import train_sft

log = logging.getLogger("alignflow")

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


def resolve_eval_models(cfg) -> None:
    """``alignflow eval``: ``policy``, ``reference`` or a ``frontier`` entry equal to ``builtin:sft`` becomes the
    built-in SFT model of ``cfg.task`` (seed 0, as the presets build it; in place)."""
    names = [cfg.policy, cfg.reference, *cfg.frontier]
    if BUILTIN_SFT not in names:
        return
    model = str(builtin_sft_model(cfg.task, cfg.output_dir, 0, cfg.device))
    cfg.policy, cfg.reference = (model if n == BUILTIN_SFT else n for n in names[:2])
    cfg.frontier = [model if n == BUILTIN_SFT else n for n in cfg.frontier]


def resolve_model(cfg) -> None:
    """Replace ``model.name_or_path: builtin:sft`` of a training config by the built model's directory (in place)."""
    if cfg.model.name_or_path != BUILTIN_SFT:
        return
    cfg.model.name_or_path = str(
        builtin_sft_model(cfg.task, cfg.train.output_dir, cfg.train.seed, cfg.train.device, cfg.train.progress)
    )
