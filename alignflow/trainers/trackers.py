"""Experiment trackers behind the run logger: TensorBoard, Weights & Biases, MLflow (``train.report_to``).

``metrics.jsonl`` is always written; every name in ``train.report_to`` adds one tracker that receives the same
scalars at the same steps. Each tracker's library is imported only when it is asked for:

* ``tensorboard``: event files under ``<run>/tb`` (skipped, with one log line, when tensorboard is missing --
  it is the default, so a missing optional package must not stop a run);
* ``wandb``: a W&B run named after the run directory, its config the run's ``config.json``; project from
  ``WANDB_PROJECT`` (default ``alignflow``); install with ``pip install 'alignflow[wandb]'``;
* ``mlflow``: an MLflow run named after the run directory, the config flattened into its params; tracking URI and
  experiment from MLflow's own environment variables; install with ``pip install 'alignflow[mlflow]'``.

A W&B or MLflow run id is kept in ``<run>/trackers.json``, so a logger that reopens the same run directory (the
reward trainer's final evaluation, a resumed run) continues the same tracker run instead of starting a new one.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from alignflow.config import ConfigError

log = logging.getLogger("alignflow")

TRACKERS = ("tensorboard", "wandb", "mlflow")
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the alignflow extra that installs it
IDS_FILE = "trackers.json"


def run_config(run_dir: Path) -> dict:
    """The run's saved ``config.json`` (or its parent's: ensemble members log into sub-directories); {} if none."""
    for d in (run_dir, run_dir.parent):
        try:
            return json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            continue
    return {}


def configured_report_to(config: dict) -> list:
    """``train.report_to`` of a saved config; the default (TensorBoard only) when the config has none."""
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    value = train.get("report_to", ["tensorboard"])
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_report_to(names: list) -> list:
    """The names, validated: ConfigError naming the valid choices for an unknown one."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: {name!r} is not one of {', '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


def _import(name: str, extra: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            f"train.report_to: {name!r} needs the {name} package, which is not installed; "
            f"pip install 'alignflow[{extra}]' (or drop {name} from train.report_to)"
        ) from None


def _ids(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _save_id(run_dir: Path, key: str, value: str) -> None:
    ids = _ids(run_dir) | {key: value}
    (run_dir / IDS_FILE).write_text(json.dumps(ids, indent=1) + "\n")


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": "0.001"}`` (MLflow params are flat strings)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, scalars: dict) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict, resume: bool):
        wandb = _import("wandb", "wandb")
        run_id = _ids(run_dir).get("wandb") if resume else None
        run_id = run_id or uuid.uuid4().hex[:12]
        _save_id(run_dir, "wandb", run_id)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "alignflow"),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
        )

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict, resume: bool):
        self.mlflow = _import("mlflow", "mlflow")
        run_id = _ids(run_dir).get("mlflow") if resume else None
        if run_id:
            run = self.mlflow.start_run(run_id=run_id)
        else:
            run = self.mlflow.start_run(run_name=run_dir.name)
            _save_id(run_dir, "mlflow", run.info.run_id)
            if config:
                self.mlflow.log_params(flatten(config))

    def log(self, step: int, scalars: dict) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def open_trackers(run_dir: str | Path, resume: bool = False, report_to: list | None = None) -> list:
    """The trackers of ``report_to`` (default: the run's saved ``train.report_to``) for ``run_dir``."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    names = check_report_to(configured_report_to(config) if report_to is None else list(report_to))
    out = []
    for name in names:
        if name == "tensorboard":
            try:
                out.append(TensorBoardTracker(run_dir))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only")
        elif name == "wandb":
            out.append(WandbTracker(run_dir, config, resume))
        else:
            out.append(MlflowTracker(run_dir, config, resume))
    return out
