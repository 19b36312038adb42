"""Checkpoints: atomic, no pickle, and a round trip restores model, optimiser, scheduler and RNG."""

import json

import pytest
import torch

from alignflow.config import OptimConfig
from alignflow.distributed.checkpoint import atomic_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from alignflow.trainers.loop import build_optimizer, build_scheduler


def _setup(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = build_optimizer(model, OptimConfig(lr=1e-2, warmup_ratio=0.2))
    sched = build_scheduler(opt, OptimConfig(lr=1e-2, warmup_ratio=0.2), total_steps=10)
    return model, opt, sched


def _step(model, opt, sched):
    loss = model(torch.randn(16, 4)).pow(2).mean()  # draws from the global RNG: RNG state matters
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def test_round_trip_continues_identically(tmp_path):
    model, opt, sched = _setup(0)
    for _ in range(3):
        _step(model, opt, sched)
    save_checkpoint(tmp_path / "checkpoints" / "step-3", model, opt, sched, {"step": 3})
    expected = [_step(model, opt, sched) for _ in range(3)]

    model2, opt2, sched2 = _setup(1)  # different init and RNG: everything must come from the checkpoint
    state = load_checkpoint(latest_checkpoint(tmp_path), model2, opt2, sched2)
    assert state["step"] == 3
    assert [_step(model2, opt2, sched2) for _ in range(3)] == pytest.approx(expected, rel=1e-6)


def test_files_are_safetensors_and_json_only(tmp_path):
    model, opt, sched = _setup(0)
    _step(model, opt, sched)
    path = save_checkpoint(tmp_path / "step-1", model, opt, sched, {"step": 1})
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.safetensors",
        "trainer_state.json",
    ]
    json.loads((path / "trainer_state.json").read_text())


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_latest_ignores_incomplete(tmp_path):
    model, opt, sched = _setup(0)
    save_checkpoint(tmp_path / "checkpoints" / "step-2", model, opt, sched, {"step": 2})
    (tmp_path / "checkpoints" / "step-9").mkdir()  # no trainer_state.json: a crashed write
    assert latest_checkpoint(tmp_path).name == "step-2"
