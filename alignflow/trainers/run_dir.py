"""The run directory's safety rules, shared by every trainer.

* :func:`check_output_dir`: ``train.output_dir`` must be a non-empty path to a directory this process can write
  (an empty value would write into the current directory; a file or a place that cannot be written is one line
  naming the key; a disk that fills up during the run is one line from the CLI, :func:`disk_error`).
* :func:`prepare_run_dir`: a directory that already holds a run's results (``model/``, a non-empty
  ``metrics.jsonl``, checkpoints) is only reused when ``train.resume`` finds a checkpoint to go on from, or when
  ``train.overwrite=true`` says to replace it (its old checkpoints are then deleted, so that a later resume cannot
  pick one of them up). Leftovers of writers that died (``*.tmp-<pid>``, ``*.old-<pid>``, ``step-N.tmp``) are
  removed first; a ``model.old-<pid>`` whose ``model/`` is missing (a kill between the two renames of the
  fallback swap) is renamed back.
* :func:`checkpoint_step`: called after every optimiser step (RL step, round) with the trainer's save function;
  it saves every ``train.save_every`` steps and at the last one, keeps the newest ``train.save_total_limit``
  checkpoints, and turns a Ctrl-C into a checkpoint plus :class:`TrainingInterrupted`.

Ctrl-C: while a training loop's progress bar is open (:func:`arm_interrupt` / :func:`disarm_interrupt`, called
by ``loop.Progress``) the first SIGINT only sets a flag; the step in flight finishes, :func:`checkpoint_step`
saves ``checkpoints/step-N`` and raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``). A second SIGINT
stops at once, without a checkpoint. Outside the loops (data preparation, final evaluation, export) Ctrl-C
behaves as usual.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from alignflow.config import ConfigError
from alignflow.distributed.checkpoint import latest_checkpoint

log = logging.getLogger("alignflow")

# atomic_dir's temporary and moved-aside names (pid suffix) of the model and of numbered checkpoint parts
_TEMP = re.compile(r"(model|[A-Za-z_]+-\d+(?:\.safetensors)?)\.(tmp|old)-(\d+)")
_SHARDED_TMP = re.compile(r"step-\d+\.tmp")  # the sharded writer's temporary (ranks share one name)
_NUMBERED = re.compile(r"([A-Za-z_]+)-(\d+)(\.safetensors)?")  # step-N, critic-N, apo_prev-N.safetensors


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the step in flight finished; ``checkpoint`` is where it was saved (None when
    the save failed: ``reason`` says why)."""

    def __init__(self, step: int, checkpoint: Path | None, reason: str = ""):
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint, self.reason = step, checkpoint, reason


# ----------------------------------------------------------------------------------------------- the directory
def check_output_dir(path: str, key: str = "train.output_dir") -> Path:
    """``path`` as a directory that exists and can be written; ConfigError naming ``key`` otherwise."""
    if not str(path).strip():
        raise ConfigError(
            f"{key} is empty; give the run its own directory (e.g. {key}=runs/my-run) -- an empty "
            f"one would write into the current directory"
        )
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a directory; choose a directory for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"{key}={path} cannot be written ({e.strerror or e}); choose a writable directory with free space"
        ) from None
    return out


def _checkpoint_roots(out: Path) -> list[Path]:
    """``checkpoints/`` of the run and of its sub-runs (reward-model ensemble members ``member-i/``)."""
    return [p for p in [out / "checkpoints", *sorted(out.glob("member-*/checkpoints"))] if p.is_dir()]


def _has_checkpoint(out: Path) -> bool:
    return any((p / "trainer_state.json").is_file() for root in _checkpoint_roots(out) for p in root.glob("step-*"))


def existing_results(out: Path) -> list[str]:
    """What in ``out`` a new run would replace: ``model/``, a non-empty ``metrics.jsonl``, ``checkpoints/``."""
    found = []
    if (out / "model").exists() or any(out.glob("member-*/model")):  # (task/model is the built-in task's)
        found.append("model/")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    if _has_checkpoint(out):
        found.append("checkpoints/")
    return found


def prepare_run_dir(train, check_only: bool = False) -> Path:
    """Check ``train.output_dir`` (a ``TrainConfig``), remove dead writers' leftovers and refuse to replace an
    earlier run's results unless told to (module docstring). Returns the directory. ``check_only``: only the
    checks (the trainers run them before costly preparation too), nothing is removed."""
    out = check_output_dir(train.output_dir)
    if not check_only:
        remove_stale_temps(out)
    if train.resume and _has_checkpoint(out):
        return out
    found = existing_results(out)
    if not found or (check_only and train.overwrite):
        return out
    if not train.overwrite:
        why = "train.resume=true found no checkpoint to go on from" if train.resume else "train.resume is false"
        hint = ", train.resume=true to continue from its last checkpoint" if _has_checkpoint(out) else ""
        raise ConfigError(
            f"train.output_dir={out} already holds a run ({', '.join(found)}) and {why}; a new run "
            f"would replace it. Choose a new train.output_dir{hint}, or set train.overwrite=true "
            f"to replace it"
        )
    log.warning("train.overwrite=true: replacing the run in %s (%s)", out, ", ".join(found))
    for root in _checkpoint_roots(out):
        shutil.rmtree(root)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete temporary directories/files left by dead writers under ``out`` (two levels down); a moved-aside
    ``X.old-<pid>`` whose ``X`` is missing is renamed back to ``X`` instead. Returns what was removed."""
    removed = []
    places = [out, out / "checkpoints", *[p for p in out.glob("*") if p.is_dir()], *out.glob("*/checkpoints")]
    for place in dict.fromkeys(places):
        if not place.is_dir():
            continue
        for p in list(place.iterdir()):
            m = _TEMP.fullmatch(p.name.lstrip("."))
            if m is None and not _SHARDED_TMP.fullmatch(p.name):
                continue
            if m is not None and _pid_alive(int(m.group(3))):
                continue
            final = p.with_name(m.group(1)) if m is not None else None
            if m is not None and m.group(2) == "old" and not final.exists():
                os.replace(p, final)
                log.warning("restored %s from %s (a replacement was interrupted)", final, p.name)
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p)
    if removed:
        log.info(
            "removed %d leftover temporary file(s) of interrupted writes: %s",
            len(removed),
            ", ".join(str(p) for p in removed[:5]),
        )
    return removed


# ----------------------------------------------------------------------------------------------- checkpoints
def prune_checkpoints(root: Path, keep: int) -> list[int]:
    """Keep the ``keep`` newest complete ``step-N`` under ``root`` (0 keeps all); older ones go, together with
    their companions of the same N (``critic-N``, ``cost_critic-N``, ``apo_prev-N.safetensors``). Returns the
    deleted steps."""
    if keep <= 0 or not root.is_dir():
        return []
    steps = sorted(
        int(p.name[5:]) for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "trainer_state.json").is_file()
    )
    drop = set(steps[:-keep])
    if not drop:
        return []
    entries = [(p, _NUMBERED.fullmatch(p.name)) for p in root.iterdir()]
    doomed = [p for p, m in entries if m is not None and int(m.group(2)) in drop]
    for p in sorted(doomed, key=lambda p: p.name.startswith("step-")):  # companions first, step-N last
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return sorted(drop)


def checkpoint_step(done: int, total: int, train, out: Path, save: Callable[[Path], Path | None]) -> None:
    """After step ``done`` of ``total``: ``save(out/checkpoints/step-<done>)`` when due (every ``train.save_every``
    steps and at the last one) or when Ctrl-C was pressed, then prune to ``train.save_total_limit``. After an
    interrupt it raises :class:`TrainingInterrupted`. ``save`` may return the path it wrote (default: the one
    it was given)."""
    interrupted = _STATE.requested
    due = done >= total or (train.save_every > 0 and done % train.save_every == 0)
    if not (due or interrupted):
        return
    path = out / "checkpoints" / f"step-{done}"
    if interrupted:
        disarm_interrupt(reset=True)
    try:
        path = save(path) or path
    except Exception as e:  # noqa: BLE001 -- after Ctrl-C, report the failed save instead of a traceback
        if not interrupted:
            raise
        raise TrainingInterrupted(done, None, f"{type(e).__name__}: {e}") from e
    prune_checkpoints(path.parent, train.save_total_limit)
    if interrupted:
        raise TrainingInterrupted(done, path)


# ----------------------------------------------------------------------------------------------- Ctrl-C
class _InterruptState:
    def __init__(self):
        self.requested, self.previous = False, None
        self.owners: list[weakref.ref] = []  # the open progress bars of training loops


_STATE = _InterruptState()


def _on_sigint(signum, frame) -> None:
    if not any(ref() is not None for ref in _STATE.owners):  # the loop that armed it ended with an error
        disarm_interrupt(reset=True)
        raise KeyboardInterrupt
    if _STATE.requested:
        raise KeyboardInterrupt  # the second Ctrl-C: stop now
    _STATE.requested = True
    log.warning(
        "Ctrl-C: finishing the current step to write a checkpoint (press Ctrl-C again to stop at once, without one)"
    )


def arm_interrupt(owner) -> None:
    """Defer the first SIGINT to the end of the current step while ``owner`` (a training loop's progress bar) is
    alive and has not disarmed (main thread only; nests)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if not _STATE.owners:
        _STATE.previous = signal.signal(signal.SIGINT, _on_sigint)
        _STATE.requested = False
    _STATE.owners.append(weakref.ref(owner))


def disarm_interrupt(owner=None, reset: bool = False) -> None:
    """Undo :func:`arm_interrupt` of ``owner`` (of every owner with ``reset``); with none left, the previous SIGINT
    handler is back."""
    if not _STATE.owners or threading.current_thread() is not threading.main_thread():
        return
    _STATE.owners = [] if reset else [r for r in _STATE.owners if r() is not None and r() is not owner]
    if not _STATE.owners:
        signal.signal(signal.SIGINT, _STATE.previous or signal.default_int_handler)
        _STATE.requested = False


# ----------------------------------------------------------------------------------------------- CLI messages
def interrupted_message(argv: list[str], cfg, err: BaseException) -> str:
    """One line for a Ctrl-C: where the checkpoint is and the exact command that resumes from it."""
    import shlex

    train = getattr(cfg, "train", None)
    resume = (
        "alignflow "
        + " ".join(shlex.quote(a) for a in argv if not a.startswith("train.resume="))
        + " train.resume=true"
    )
    if isinstance(err, TrainingInterrupted) and err.checkpoint is not None:
        return f"interrupted after step {err.step}; checkpoint saved at {err.checkpoint}. Resume with: {resume}"
    saved = "" if not isinstance(err, TrainingInterrupted) else f" (saving it failed: {err.reason})"
    latest = None
    if train is not None and str(train.output_dir).strip():
        latest = latest_checkpoint(train.output_dir)
    if latest is None:
        return f"interrupted; no checkpoint was written{saved}, so there is nothing to resume from"
    return f"interrupted; no checkpoint at the interrupt{saved}. The latest is {latest}; resume with: {resume}"


_DISK_ERRNOS = {
    "ENOSPC": "no space left on the device",
    "EDQUOT": "disk quota exceeded",
    "EROFS": "read-only file system",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
}


def disk_error(e: OSError) -> str | None:
    """One line for an OSError that is the disk's state (full, read-only, not permitted), or None for others."""
    import errno

    name = errno.errorcode.get(e.errno or -1, "")
    if name not in _DISK_ERRNOS:
        return None
    where = f" while writing {e.filename}" if e.filename else ""
    return f"{_DISK_ERRNOS[name]}{where}; free some space or choose a writable output directory"
