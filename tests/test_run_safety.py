"""Run-directory safety: a finished run is never replaced without being told, checkpoints by default and with
``save_total_limit``, flushed and atomic writes, leftovers of killed writers removed, no duplicate metrics after a
resume, Ray resources checked before placing, clear one-line errors for devices and output directories, Ctrl-C
checkpoints and says how to resume."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignflow.cli import main
from alignflow.config import ConfigError, RMConfig, TrainConfig, from_dict
from alignflow.distributed import checkpoint as ckpt_mod
from alignflow.models.device import resolve_device
from alignflow.trainers import run_dir
from alignflow.trainers.loop import read_metrics


def _sft_args(task, out, *extra):
    return [
        "sft",
        f"model.name_or_path={task.model_dir}",
        f"model.tokenizer={task.tokenizer_dir}",
        f"data.path={task.sft_path}",
        "data.max_len=64",
        "data.eval_fraction=0.05",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.progress=false",
        "train.log_every=1",
        f"train.output_dir={out}",
        *extra,
    ]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _cli_lines(err: str) -> list[str]:
    """The CLI's own lines on stderr (transformers' loading bars go there too)."""
    assert "Traceback" not in err
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("alignflow ")]


def _train_rows(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


# ----------------------------------------------------------------------------------------------- 1. finished runs
def test_finished_run_is_not_replaced_without_overwrite(reviews_task, tmp_path, capsys):
    """The issue's case: resume=true on a finished run whose checkpoints are gone must stop, not start over; a
    fresh empty directory with resume=true just starts; overwrite=true replaces. Checkpoint at the end by default."""
    out = tmp_path / "run"
    assert main(_sft_args(reviews_task, out, "train.resume=true")) == 0  # empty dir + resume: starts
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").exists()  # saved after the last step by default
    assert TrainConfig().save_every == 500
    import shutil

    shutil.rmtree(out / "checkpoints")
    weights = (out / "model" / "model.safetensors").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    for extra in (["train.resume=true"], []):
        assert main(_sft_args(reviews_task, out, "train.max_steps=1", *extra)) == 2
        err = _cli_lines(capsys.readouterr().err)
        assert len(err) == 1
        err = err[0]
        assert "already holds a run (model/, metrics.jsonl)" in err and "train.overwrite=true" in err
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    assert (out / "metrics.jsonl").read_text() == metrics
    assert main(_sft_args(reviews_task, out, "train.max_steps=1", "train.overwrite=true")) == 0
    assert _train_rows(out) == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    capsys.readouterr()
    assert main(_sft_args(reviews_task, out, "train.max_steps=1", "train.resume=true")) == 0  # at its end: no-op
    assert _train_rows(out) == [1]
    assert main(_sft_args(reviews_task, out, "train.max_steps=3", "train.resume=true")) == 0  # trains on
    assert _train_rows(out) == [1, 2, 3]
    assert main(_sft_args(reviews_task, out, "train.max_steps=2", "train.resume=true")) == 2  # checkpoint past it
    assert "the checkpoint resumed from is at step 3, past this run's last step 2" in capsys.readouterr().err


def test_old_checkpoints_without_resume_are_refused(tmp_path):
    """A killed run's checkpoints (no model yet) are results too: resume=false must not train over them."""
    (tmp_path / "checkpoints" / "step-3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-3" / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"checkpoints/\).*train.resume=true to continue"):
        run_dir.prepare_run_dir(TrainConfig(output_dir=str(tmp_path)))
    assert run_dir.prepare_run_dir(TrainConfig(output_dir=str(tmp_path), resume=True)) == tmp_path


def test_what_counts_as_an_earlier_run(tmp_path):
    """The built-in task's cache (task/model) and an empty metrics file are not results; an ensemble member's
    model is."""
    (tmp_path / "task" / "model").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("")
    assert run_dir.existing_results(tmp_path) == []
    (tmp_path / "member-1" / "model").mkdir(parents=True)
    assert run_dir.existing_results(tmp_path) == ["model/"]


# ----------------------------------------------------------------------------------------------- 2. total limit
def test_save_total_limit_keeps_the_newest_and_their_companions(tmp_path):
    root = tmp_path / "checkpoints"
    for n in (2, 4, 6, 8):
        for name in (f"step-{n}", f"critic-{n}"):
            (root / name).mkdir(parents=True)
            (root / name / "trainer_state.json").write_text("{}")
        (root / f"apo_prev-{n}.safetensors").write_bytes(b"x")
    (root / "step-9").mkdir()  # incomplete (no trainer_state.json): not counted, not touched
    assert run_dir.prune_checkpoints(root, 2) == [2, 4]
    assert sorted(p.name for p in root.iterdir()) == [
        "apo_prev-6.safetensors",
        "apo_prev-8.safetensors",
        "critic-6",
        "critic-8",
        "step-6",
        "step-8",
        "step-9",
    ]
    assert run_dir.prune_checkpoints(root, 0) == []  # 0 keeps all


def test_save_total_limit_in_a_run(reviews_task, tmp_path):
    out = tmp_path / "run"
    assert (
        main(_sft_args(reviews_task, out, "train.max_steps=4", "train.save_every=1", "train.save_total_limit=2")) == 0
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-4"]


# ----------------------------------------------------------------------------------------------- 3. writes
def test_checkpoint_files_and_directories_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    final, synced, real_fsync = tmp_path / "checkpoints" / "step-1", [], os.fsync

    def spy(fd):  # (what was flushed, was the checkpoint already published)
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")), final.exists()))
        real_fsync(fd)

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    monkeypatch.setattr(os, "fsync", spy)
    ckpt_mod.save_checkpoint(final, model, opt, None, {"step": 1})
    before = {p.name for p, published in synced if not published}
    assert {p.name for p in final.iterdir()} <= before  # every file, before the rename
    assert any(n.startswith("step-1.tmp-") for n in before)  # the directory itself, before the rename
    assert (final.parent, True) in synced  # the parent directory (holding the new name), after it


def test_replacing_a_directory_never_leaves_it_missing(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "w").write_text("old")
    with ckpt_mod.atomic_dir(final) as tmp:
        (tmp / "w").write_text("new")
    assert (final / "w").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing left aside


def test_a_kill_during_the_model_export_keeps_the_previous_model(tmp_path):
    """A writer SIGKILLed in the middle of replacing model/ leaves the old model/ whole; the next run start removes
    the writer's temporary directory."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w").write_text("old")
    code = (
        "import sys, time; from alignflow.distributed.checkpoint import atomic_dir\n"
        f"with atomic_dir({str(tmp_path / 'model')!r}) as tmp:\n"
        "    (tmp / 'half').write_text('x'); print('writing', flush=True); time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.kill()
    p.wait()
    assert (tmp_path / "model" / "w").read_text() == "old"
    left = tmp_path / f"model.tmp-{p.pid}"
    assert left.is_dir()
    run_dir.remove_stale_temps(tmp_path)  # what the next run does first
    assert not left.exists() and (tmp_path / "model" / "w").read_text() == "old"


def test_stale_temporaries_are_removed_and_a_half_swapped_model_restored(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    ck = tmp_path / "checkpoints"
    for name in (f"step-5.tmp-{dead}", "step-6.tmp", f"critic-5.tmp-{live}"):
        (ck / name).mkdir(parents=True)
        (ck / name / "model.safetensors").write_bytes(b"0" * 100)
    (ck / f".apo_prev-5.tmp-{dead}").write_bytes(b"0")
    (tmp_path / f"model.old-{dead}").mkdir()  # killed between the two renames of the fallback swap
    (tmp_path / f"model.old-{dead}" / "w").write_text("old")
    (tmp_path / "notes.tmp-1").write_text("not ours")
    run_dir.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in ck.iterdir()) == [f"critic-5.tmp-{live}"]  # a live writer's is kept
    assert (tmp_path / "model" / "w").read_text() == "old"
    assert (tmp_path / "notes.tmp-1").exists()


# ----------------------------------------------------------------------------------------------- 4. resume logs
def test_resumed_steps_are_logged_once(reviews_task, tmp_path):
    out = tmp_path / "run"
    assert main(_sft_args(reviews_task, out, "train.max_steps=4", "train.save_every=2")) == 0
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-4")  # as if killed after step 4 but before its checkpoint
    assert main(_sft_args(reviews_task, out, "train.max_steps=4", "train.save_every=2", "train.resume=true")) == 0
    assert _train_rows(out) == [1, 2, 3, 4]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r] == [4]


def test_rm_final_eval_is_logged_at_the_last_step_after_a_resume(reviews_task, tmp_path):
    from alignflow.trainers.rm import train_rm

    def cfg(**train):
        return from_dict(
            RMConfig,
            {
                "model": {"name_or_path": str(reviews_task.model_dir), "tokenizer": str(reviews_task.tokenizer_dir)},
                "data": {"path": str(reviews_task.pairs_path), "max_len": 64, "eval_fraction": 0.1},
                "train": {
                    "output_dir": str(tmp_path),
                    "batch_size": 8,
                    "max_steps": 4,
                    "save_every": 2,
                    "progress": False,
                    "log_every": 1,
                    **train,
                },
            },
        )

    train_rm(cfg())
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "step-4")
    train_rm(cfg(resume=True))  # 2 steps run in this process; the run's last step is 4
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [4]  # the resumed run's (the first one's: redone)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------- 5. Ray
class _FakeRay:
    def __init__(self, cpus, gpus=0.0, node_cpus=None):
        self.total = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
        self.node = {"CPU": node_cpus or cpus} | ({"GPU": gpus} if gpus else {})

    def cluster_resources(self):
        return self.total

    def nodes(self):
        return [{"Alive": True, "Resources": self.node}]


def test_ray_resources_are_checked_before_placing(monkeypatch):
    from alignflow.distributed import ray_group

    monkeypatch.setattr(ray_group, "require_ray", lambda: _FakeRay(2.0))
    with pytest.raises(ConfigError, match=r"4 CPUs in all, the cluster has 2.*resources.<role>.workers"):
        ray_group.check_resources([("workers", 4, 1.0, 0.0)])
    with pytest.raises(ConfigError, match=r"1 GPUs in all, the cluster has 0"):
        ray_group.check_resources([("workers", 1, 1.0, 1.0)])
    ray_group.check_resources([("actor", 1, 1.0, 0.0), ("ref", 1, 1.0, 0.0)])  # fits: no error
    monkeypatch.setattr(ray_group, "require_ray", lambda: _FakeRay(8.0, node_cpus=2.0))
    with pytest.raises(ConfigError, match="no node has 4 CPUs"):
        ray_group.check_resources([("workers", 2, 4.0, 0.0)])  # 8 in all, but one worker needs 4 on one node


def test_the_run_checks_its_worker_sets_before_any_work(monkeypatch):
    """``alignflow po`` / ``rl`` check the whole plan (every worker set) first: the po policy set, and the RL sets
    of a split placement summed (2 actor + 2 ref + 1 critic workers = 5 CPUs on a 4-CPU cluster)."""
    from alignflow.config import POConfig, RLConfig
    from alignflow.distributed import placement, ray_group

    monkeypatch.setattr(ray_group, "require_ray", lambda: _FakeRay(4.0))
    monkeypatch.setattr(placement, "init_ray", lambda *a: None)
    po = from_dict(POConfig, {"resources": {"actor": {"workers": 8}}})
    with pytest.raises(ConfigError, match=r"'policy' 8 x \(1 CPU, 0 GPU\)\): 8 CPUs in all, the cluster has 4"):
        placement.check_placement(po)
    rl = from_dict(RLConfig, {"resources": {"placement": "split", "actor": {"workers": 2}, "critic": {"workers": 1}}})
    with pytest.raises(ConfigError, match=r"'actor' 2 x .*'ref' 2 x .*'critic' 1 x .*5 CPUs in all, the cluster has 4"):
        placement.check_placement(rl, ("actor", "rollout", "reward", "ref", "critic"))
    placement.check_placement(from_dict(POConfig, {}))  # one process: nothing to check


def test_a_worker_set_larger_than_the_local_cluster_fails_at_once():
    """Real Ray, 2 CPUs: a 4-worker set used to wait forever for its placement group."""
    pytest.importorskip("ray")
    import ray

    from alignflow.distributed.ray_group import WorkerSet, init_ray

    started_here = not ray.is_initialized()
    init_ray(num_cpus=2)  # (a cluster another test started is used as it is)
    try:
        have = int(ray.cluster_resources()["CPU"])
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=f"{have + 2} CPUs in all, the cluster has {have}"):
            WorkerSet("workers", have + 2, dict, (), cpus=1.0, timeout_s=600)
        assert time.perf_counter() - t0 < 30
    finally:
        if started_here:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------- 6. devices, dirs
def test_devices_that_are_not_there_are_config_errors():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device=cuda but CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="train.device='tpu9' is not a device"):
        resolve_device("tpu9")
    with pytest.raises(ConfigError, match=r"train.device=cuda:99 but this machine has \d+ CUDA|not available"):
        resolve_device("cuda:99")
    assert resolve_device("cpu") == torch.device("cpu")


def test_output_dir_empty_file_or_unwritable_is_one_line(reviews_task, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_sft_args(reviews_task, "")) == 2
    assert "train.output_dir is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written into the current directory
    (tmp_path / "f").write_text("x")
    assert main(_sft_args(reviews_task, tmp_path / "f")) == 2
    assert "is a file, not a directory" in capsys.readouterr().err

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(run_dir.tempfile, "mkstemp", read_only)
    assert main(_sft_args(reviews_task, tmp_path / "ro")) == 2
    err = _cli_lines(capsys.readouterr().err)
    assert len(err) == 1 and "cannot be written (Read-only file system)" in err[0]


def test_a_full_disk_is_one_line(reviews_task, tmp_path, monkeypatch, capsys):
    """safetensors reports ENOSPC as SafetensorError('... (os error 28)'); the CLI says so in one line."""
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    assert main(_sft_args(reviews_task, tmp_path / "run")) == 2
    err = _cli_lines(capsys.readouterr().err)
    assert len(err) == 1 and "no space left on the device while writing" in err[0] and "step-2" in err[0]
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # the half-written checkpoint was removed


# ----------------------------------------------------------------------------------------------- 7. Ctrl-C
def test_ctrl_c_checkpoints_and_prints_the_resume_command(reviews_task, tmp_path, monkeypatch, capsys):
    from alignflow.trainers import sft

    real, calls = sft.train_step, []

    def step_then_sigint(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 2: it finishes, then the run stops
        return real(*a, **k)

    monkeypatch.setattr(sft, "train_step", step_then_sigint)
    out = tmp_path / "run"
    args = _sft_args(reviews_task, out, "train.max_steps=5")
    assert main(args) == 130
    err = _cli_lines(capsys.readouterr().err)
    assert len(err) == 1
    assert f"interrupted after step 2; checkpoint saved at {out / 'checkpoints' / 'step-2'}" in err[0]
    assert err[0].endswith("train.max_steps=5 train.resume=true")
    assert len(calls) == 2 and not (out / "model").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    monkeypatch.setattr(sft, "train_step", real)
    resume = err[0].split("Resume with: alignflow ", 1)[1].split()
    assert main(resume) == 0
    assert _train_rows(out) == [1, 2, 3, 4, 5]


def test_a_second_ctrl_c_stops_at_once(reviews_task, tmp_path, monkeypatch, capsys):
    from alignflow.trainers import sft

    real = sft.train_step

    def two_sigints(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(sft, "train_step", two_sigints)
    assert main(_sft_args(reviews_task, tmp_path / "run")) == 130
    err = _cli_lines(capsys.readouterr().err)
    assert err == ["alignflow sft: interrupted; no checkpoint was written, so there is nothing to resume from"]


def test_ctrl_c_after_a_loop_that_failed_is_a_plain_keyboard_interrupt():
    """A training loop that ended with an error never closed its bar; once the bar is gone, Ctrl-C is not deferred
    to a step that will not come."""
    from alignflow.trainers.loop import Progress

    bar = Progress(3, 0, False, "sft")
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # deferred while the loop runs
    del bar  # the loop's frame is gone (an exception was raised and handled)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
