"""The end of a CLI run: hub.push through huggingface_hub's HfApi (patched: no network) and the summary line."""

import json
import shutil

import pytest

from alignflow.config import ConfigError, SFTConfig, load_config
from alignflow.trainers import finish


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, private, repo_type, exist_ok):
        FakeApi.calls.append(("create_repo", repo_id, private, repo_type, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, branch, repo_type, exist_ok):
        FakeApi.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, repo_type, revision, commit_message):
        files = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())
        FakeApi.calls.append(("upload_folder", repo_id, files, revision))


def finished_run(tmp_path, *overrides):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_bytes(b"x")
    (out / "model" / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text(
        json.dumps({"step": 10, "train/loss": 2.0}) + "\n" + json.dumps({"step": 20, "train/loss": 1.25}) + "\n"
    )
    return load_config(SFTConfig, None, [f"train.output_dir={out}", *overrides]), out


def test_push_uploads_the_final_model_folder(tmp_path, monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    cfg, out = finished_run(tmp_path, "hub.push=true", "hub.repo_id=me/tiny", "hub.private=true", "hub.revision=v1")
    line = finish.finish("sft", cfg, 12.0)
    assert FakeApi.calls == [
        ("init", "hf_secret"),
        ("create_repo", "me/tiny", True, "model", True),
        ("create_branch", "me/tiny", "v1"),
        ("upload_folder", "me/tiny", ["config.json", "model.safetensors"], "v1"),
    ]
    assert "pushed to https://huggingface.co/me/tiny" in line and str(out / "model") in line


def test_no_push_unless_asked(tmp_path, monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    cfg, _ = finished_run(tmp_path)
    finish.finish("sft", cfg, 1.0)
    assert FakeApi.calls == []


def test_failed_upload_is_one_line_naming_the_local_copy(tmp_path, monkeypatch):
    class Down(FakeApi):
        def create_repo(self, *a, **k):
            raise OSError("Connection refused\nlong trace")

    monkeypatch.setattr("huggingface_hub.HfApi", Down)
    cfg, out = finished_run(tmp_path, "hub.push=true", "hub.repo_id=me/tiny")
    with pytest.raises(finish.HubPushError) as e:
        finish.finish("sft", cfg, 1.0)
    assert "\n" not in str(e.value) and "Connection refused" in str(e.value) and str(out / "model") in str(e.value)


def test_push_without_repo_id_fails_before_training():
    with pytest.raises(ConfigError, match="hub.repo_id"):
        finish.preflight(load_config(SFTConfig, None, ["hub.push=true"]))


def test_summary_line_names_the_model_and_headline_metrics(tmp_path):
    cfg, out = finished_run(tmp_path)
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 20, "eval/loss": 1.5, "eval/gold_reward": 0.25, "data/report": "x"}) + "\n")
    line = finish.summary_line("sft", cfg, 41.2)
    assert line == f"alignflow sft: done in 41 s; model at {out / 'model'}; eval/gold_reward 0.25, eval/loss 1.5"
    (out / "metrics.jsonl").write_text(json.dumps({"step": 5, "train/loss": 0.5}) + "\n")
    assert finish.summary_line("sft", cfg, 1).endswith("; train/loss 0.5")


def test_summary_line_of_a_policy_the_safety_test_refused(tmp_path):
    """HC-RLHF refused the policy (safety_test.json passed false, no model/): the line said "model at <run dir>"."""
    cfg, out = finished_run(tmp_path)
    shutil.rmtree(out / "model")
    (out / "safety_test.json").write_text(json.dumps({"passed": False, "bound": 0.63}))
    line = finish.summary_line("rl", cfg, 32.4)
    assert line.startswith(f"alignflow rl: done in 32 s; NO model: the safety test refused it ({out}/safety_test.json)")
    (out / "safety_test.json").write_text(json.dumps({"passed": True, "bound": 0.3}))
    (out / "model").mkdir()
    assert f"model at {out / 'model'}" in finish.summary_line("rl", cfg, 1)


def test_cli_prints_the_summary_line_last(tmp_path, reviews_task, capsys):
    """A real (tiny) SFT run through the CLI ends with the one summary line."""
    from alignflow.cli import main

    out = tmp_path / "sft"
    rc = main(
        [
            "sft",
            f"model.name_or_path={reviews_task.model_dir}",
            f"model.tokenizer={reviews_task.tokenizer_dir}",
            f"data.path={reviews_task.sft_path}",
            "train.max_steps=2",
            "train.batch_size=8",
            "train.progress=false",
            "train.report_to=[]",
            f"train.output_dir={out}",
        ]
    )
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("alignflow sft: done in ") and f"model at {out / 'model'}" in last and "loss" in last


def test_every_training_command_ends_with_the_summary_line():
    """refuel, pm, vpl and qdhf ended without it: every command whose config has a train section prints it."""
    import dataclasses

    from alignflow.cli import COMMANDS

    trains = [c for c, (cls, _, _) in COMMANDS.items() if "train" in {f.name for f in dataclasses.fields(cls)}]
    assert set(trains) <= set(finish.RESULT_COMMANDS), set(trains) - set(finish.RESULT_COMMANDS)
    assert {"refuel", "pm", "vpl", "qdhf"} <= set(trains)
