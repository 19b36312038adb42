"""Built-in tasks: everything a run needs (tokenizer, tiny model, data, gold reward), built locally from a seed.

    from alignflow.tasks import build_task
    art = build_task("reviews", TaskConfig(), "runs/demo/task")
    art.sft_path, art.model_dir, art.gold_reward(prompts, responses)

A task directory holds ``tokenizer/``, ``model/``, ``sft.jsonl``, ``prompts.jsonl``, ``eval_prompts.jsonl``,
``pairs.jsonl``, ``rated.jsonl`` and ``task.json`` (the config and a hash of the task's source). Building again
with the same
config and code reuses the directory; otherwise it is rebuilt in a temporary directory and swapped in, so a
reader never sees a half-written task. See ``docs/tasks.md``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import uuid
from pathlib import Path

from alignflow.config import ConfigError, TaskConfig
from alignflow.tasks import arithmetic, bandit, calculator, code, common, reviews, reviews_judge, reviews_rewrite, users
from alignflow.tasks.common import FILES, MANIFEST, TaskArtifacts, TaskSpec

TASKS = {
    "reviews": reviews.TASK,
    "arithmetic": arithmetic.TASK,
    "calculator": calculator.TASK,
    "code": code.TASK,
    "bandit": bandit.TASK,
}
# task -> modules with FILES and write_files(cfg, dir): the judge data, the users' preferences (P-DPO, VPL),
# the rewrite data of the seq2seq reward model
EXTRA_FILES = {"reviews": (reviews_judge, users, reviews_rewrite)}

__all__ = ["TASKS", "TaskArtifacts", "TaskSpec", "build_task", "get_task"]


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ConfigError(f"task.name: {name!r} is not one of {', '.join(TASKS)}")
    return TASKS[name]


def _source_hash(spec: TaskSpec) -> str:
    """Hash of the code that writes the task, so a changed generator never reuses stale files."""
    h = hashlib.sha256()
    extra = EXTRA_FILES.get(spec.name, ())
    for mod in (common, sys.modules[spec.make_rows.__module__], *extra):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def _is_complete(out_dir: Path, name: str = "") -> bool:
    extra = [rel for mod in EXTRA_FILES.get(name, ()) for rel in mod.FILES.values()]
    return all((out_dir / rel).exists() for rel in (*FILES.values(), *extra))


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp`` with renames (the old directory is moved aside, then deleted)."""
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
            raise FileExistsError(
                f"{out_dir} exists and is not a task directory (no {MANIFEST}); refusing to overwrite it"
            )
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_task(name: str, cfg: TaskConfig, out_dir: str | Path) -> TaskArtifacts:
    """Build task ``name`` from ``cfg`` into ``out_dir`` (reused when already built from the same config/code)."""
    spec = get_task(name)
    out_dir = Path(out_dir)
    meta = common.manifest(spec, cfg, _source_hash(spec))
    if common.read_manifest(out_dir) == meta and _is_complete(out_dir, name):
        return common.artifacts(spec, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir()
        common.write_task(spec, cfg, tmp, meta)
        for mod in EXTRA_FILES.get(name, ()):
            mod.write_files(cfg, tmp)
        _swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return common.artifacts(spec, out_dir)
