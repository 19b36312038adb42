"""What every CLI run does around its trainer: a pre-flight check of the tracker and Hub settings, the upload of
the final model to the Hugging Face Hub (``hub.push``), and one summary line at the end.

The summary line says where the result is and the headline metrics, e.g.::

    alignflow sft: done in 41 s; model at runs/sft/model; eval/loss 1.52, train/loss 1.47

The headline metrics are the ``eval/*`` values of the run's last logged rows (the gold reward, accuracy, held-out
loss ...), at most ``MAX_METRICS`` of them, else the last training loss.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from alignflow.config import ConfigError
from alignflow.trainers.trackers import EXTRAS, check_report_to

log = logging.getLogger("alignflow")

MAX_METRICS = 4
# Preferred headline metrics, in this order; other eval/* keys follow alphabetically.
PREFERRED = (
    "eval/gold_reward",
    "eval/accuracy",
    "eval/reward/accuracy",
    "eval/reward_mean",
    "eval/grammatical",
    "eval/loss",
    "eval/gold_reward_mpo",
    "eval/kl",
)


RESULT_COMMANDS = (
    *("sft", "ift", "rm", "pm", "rl", "po", "online_po", "superhf", "alol", "cgpo", "mpo", "refuel", "vpl", "qdhf"),
    *("eval", "demo"),
)


class HubPushError(RuntimeError):
    """The upload to the Hub failed (the model is still saved locally; the message says where)."""


def preflight(cfg) -> None:
    """Fail before any training on settings that would only fail at the end: unknown or missing trackers, a push
    without a repository, a push without huggingface_hub."""

    train = getattr(cfg, "train", None)
    for name in check_report_to(train.report_to) if train is not None else []:
        if name in EXTRAS and importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"train.report_to: {name!r} needs the {name} package, which is not installed; "
                f"pip install 'alignflow[{EXTRAS[name]}]' (or drop {name} from train.report_to)"
            )
    hub = getattr(cfg, "hub", None)
    if hub is not None and hub.push:
        if not hub.repo_id or hub.repo_id.count("/") > 1:
            raise ConfigError(
                f"hub.repo_id: {hub.repo_id!r} -- hub.push=true needs the repository as 'name' or 'owner/name'"
            )
        if importlib.util.find_spec("huggingface_hub") is None:
            raise ConfigError("hub.push=true needs the huggingface_hub package (pip install huggingface_hub)")


def result_path(command: str, cfg) -> Path | None:
    """Where a command leaves its result: the final model directory (the run directory when there is none, e.g.
    a reward-model ensemble of separate members), the report (demo) or eval.json (eval)."""
    if command == "demo":
        return Path(cfg.output_dir) / "report.md"
    if command == "eval":
        return Path(cfg.output_dir) / "eval.json"
    if command == "mpo":
        out = Path(cfg.output_dir)
        return next((p for p in (out / "rl" / "model", out / "dpo" / "model") if p.is_dir()), out)
    out = Path(cfg.train.output_dir)
    return out / "model" if (out / "model").is_dir() else out


def _metric_rows(command: str, cfg) -> list[dict]:
    if command == "eval":
        path = Path(cfg.output_dir) / "eval.json"
        return [json.loads(path.read_text())] if path.is_file() else []
    if command == "mpo":
        path = Path(cfg.output_dir) / "mpo.json"
        return [json.loads(path.read_text())] if path.is_file() else []
    out = Path(cfg.output_dir if command == "demo" else cfg.train.output_dir)
    for path in (out / "metrics.jsonl", out / "rl" / "metrics.jsonl"):
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return []


def headline(rows: list[dict]) -> dict:
    """Up to MAX_METRICS numbers of the last rows: eval/* first (PREFERRED order), else the last train/loss."""
    last: dict = {}
    for row in rows:
        last |= {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    evals = [k for k in PREFERRED if k in last] + sorted(
        k for k in last if k.startswith("eval/") and k not in PREFERRED
    )
    keys = evals[:MAX_METRICS] or [k for k in ("train/loss", "loss") if k in last][:1]
    return {k: last[k] for k in keys}


def summary_line(command: str, cfg, seconds: float, pushed: str = "") -> str:
    """``alignflow <command>: done in N s; <what> at <path>; metric value, ...``."""
    where = result_path(command, cfg)
    what = {"demo": "report", "eval": "metrics"}.get(command, "model")
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in headline(_metric_rows(command, cfg)).items())
    line = f"alignflow {command}: done in {seconds:.0f} s; {what} at {where}"
    out = Path(cfg.train.output_dir) if command == "rl" else None
    if out is not None and (out / "safety_test.json").is_file() and not (out / "model").is_dir():
        if not json.loads((out / "safety_test.json").read_text()).get("passed", True):  # HC-RLHF refused it
            test = out / "safety_test.json"
            line = f"alignflow {command}: done in {seconds:.0f} s; NO model: the safety test refused it ({test})"
    line += f"; pushed to {pushed}" if pushed else ""
    return line + (f"; {metrics}" if metrics else "")


def push_to_hub(folder: Path, hub, command: str) -> str:
    """Upload ``folder`` to ``hub.repo_id`` (created when missing, ``hub.private``) with huggingface_hub's HfApi; the
    token is read from ``HF_TOKEN`` (else huggingface_hub's saved login). Returns the repository URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise HubPushError(f"hub.push: nothing to upload, {folder} is not a directory")
    api = HfApi(token=os.environ.get("HF_TOKEN") or None)
    try:
        url = api.create_repo(hub.repo_id, private=hub.private, repo_type="model", exist_ok=True)
        if hub.revision:
            api.create_branch(hub.repo_id, branch=hub.revision, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=hub.repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=hub.revision or None,
            commit_message=f"alignflow {command}: {folder.name}",
        )
    except Exception as e:  # network, authentication, permissions: one line, the local copy is named
        raise HubPushError(
            f"hub.push: uploading {folder} to {hub.repo_id} failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the model is saved at {folder}"
        ) from None
    return str(url)


def finish(command: str, cfg, seconds: float) -> str:
    """After a successful run: push when ``hub.push``, then return the summary line ("" for a command that leaves
    no result to point at, such as a server)."""
    if command not in RESULT_COMMANDS:
        return ""
    hub = getattr(cfg, "hub", None)
    pushed = ""
    if hub is not None and hub.push:
        folder = result_path(command, cfg)
        log.info("pushing %s to the Hub repository %s", folder, hub.repo_id)
        pushed = push_to_hub(folder, hub, command)
    return summary_line(command, cfg, seconds, pushed)
