"""train.report_to: TensorBoard, W&B and MLflow behind the run logger, with fake tracker modules (no network)."""

import json
import sys
import types

import pytest

from alignflow.config import ConfigError, SFTConfig, load_config
from alignflow.trainers.loop import MetricsLogger


class FakeWandbRun:
    def __init__(self, calls, **kw):
        self.calls = calls
        calls.append(("init", kw))

    def log(self, scalars, step):
        self.calls.append(("log", step, dict(scalars)))

    def finish(self):
        self.calls.append(("finish",))


def fake_wandb(calls):
    mod = types.ModuleType("wandb")
    mod.init = lambda **kw: FakeWandbRun(calls, **kw)
    return mod


def fake_mlflow(calls):
    mod = types.ModuleType("mlflow")

    def start_run(run_id=None, run_name=None):
        calls.append(("start_run", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "run-123"))

    mod.start_run = start_run
    mod.log_params = lambda params: calls.append(("log_params", dict(params)))
    mod.log_metrics = lambda metrics, step: calls.append(("log_metrics", step, dict(metrics)))
    mod.end_run = lambda: calls.append(("end_run",))
    return mod


def write_config(run, report_to):
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({"optim": {"lr": 0.001}, "train": {"report_to": report_to}}))


def test_wandb_and_mlflow_get_the_logged_scalars(tmp_path, monkeypatch):
    calls_w, calls_m = [], []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls_w))
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow(calls_m))
    run = tmp_path / "my-run"
    write_config(run, ["wandb", "mlflow"])
    logger = MetricsLogger(run)
    logger.log(3, {"train/loss": 1.5, "data/report": "skipped 0 rows"})
    logger.close()
    init = calls_w[0][1]
    assert init["name"] == "my-run" and init["config"]["optim"]["lr"] == 0.001 and init["resume"] == "allow"
    assert calls_w[1:] == [("log", 3, {"train/loss": 1.5}), ("finish",)]  # strings stay in metrics.jsonl only
    assert calls_m[0] == ("start_run", None, "my-run")
    assert calls_m[1] == ("log_params", {"optim.lr": "0.001", "train.report_to": "['wandb', 'mlflow']"})
    assert calls_m[2:] == [("log_metrics", 3, {"train/loss": 1.5}), ("end_run",)]
    assert json.loads((run / "metrics.jsonl").read_text())["train/loss"] == 1.5


def test_a_reopened_run_continues_the_same_tracker_runs(tmp_path, monkeypatch):
    """The reward trainer reopens its logger for the final eval (resume=True): same W&B id, same MLflow run."""
    calls_w, calls_m = [], []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls_w))
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow(calls_m))
    run = tmp_path / "rm"
    write_config(run, ["wandb", "mlflow"])
    MetricsLogger(run).close()
    MetricsLogger(run, resume=True).close()
    inits = [c[1] for c in calls_w if c[0] == "init"]
    assert inits[0]["id"] == inits[1]["id"]
    starts = [c for c in calls_m if c[0] == "start_run"]
    assert starts == [("start_run", None, "rm"), ("start_run", "run-123", None)]


def test_missing_tracker_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    run = tmp_path / "run"
    write_config(run, ["wandb"])
    with pytest.raises(ConfigError, match=r"pip install 'alignflow\[wandb\]'"):
        MetricsLogger(run)


def test_unknown_tracker_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="tensorboard, wandb, mlflow"):
        MetricsLogger(tmp_path / "run", report_to=["neptune"])


def test_report_to_defaults_to_tensorboard_and_can_be_empty(tmp_path, monkeypatch):
    """TensorBoard (a fake SummaryWriter here) is the default tracker; [] turns every tracker off."""
    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("dir", logdir))

        def add_scalar(self, k, v, step):
            calls.append((k, v, step))

        def close(self):
            calls.append(("close",))

    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    assert load_config(SFTConfig).train.report_to == ["tensorboard"]
    logger = MetricsLogger(tmp_path / "a")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert calls == [("dir", str(tmp_path / "a" / "tb")), ("loss", 1.0, 1), ("close",)]
    calls.clear()
    write_config(tmp_path / "b", [])
    MetricsLogger(tmp_path / "b").close()
    assert calls == []


def test_missing_tensorboard_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    logger = MetricsLogger(tmp_path / "run")
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 1.0}'


def test_preflight_fails_before_training_when_a_tracker_is_missing(monkeypatch):
    from alignflow.trainers.finish import preflight

    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "mlflow" else object())
    with pytest.raises(ConfigError, match=r"alignflow\[mlflow\]"):
        preflight(load_config(SFTConfig, None, ["train.report_to=mlflow"]))
