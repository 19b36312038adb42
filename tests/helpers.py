"""Shared test fixtures' builders: a tiny built-in task on disk, built once per session."""

from pathlib import Path

from alignflow.config import TaskConfig
from alignflow.tasks import build_task


def tiny_task(root: Path, name: str = "reviews", **kw):
    cfg = TaskConfig(
        name=name,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        num_sft=kw.pop("num_sft", 400),
        num_pairs=kw.pop("num_pairs", 300),
        **kw,
    )
    return build_task(name, cfg, root / f"task-{name}")
