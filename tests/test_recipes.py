"""The recipe runner (alignflow/recipes): stage parsing, ${...} references, errors naming the stage and key,
skipping finished stages, and resuming a stage killed mid-way through its own checkpoints."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignflow.cli import COMMANDS, main
from alignflow.config import ConfigError, load_config
from alignflow.recipes import RecipeConfig
from alignflow.recipes.runner import plan
from alignflow.recipes.spec import STAGE_COMMANDS, parse_stages, resolve

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, stages: list, **top) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump({"command": "recipe", "name": "t", "output_dir": str(tmp_path / "out"), "stages": stages, **top})
    )
    return path


def _sft_stage(task, name: str, steps: int, **over) -> dict:
    return {
        "name": name,
        "command": "sft",
        "overrides": {
            "model": {"name_or_path": str(task.model_dir), "tokenizer": str(task.tokenizer_dir)},
            "data": {"path": str(task.sft_path), "max_len": 64, "eval_fraction": 0.0},
            "optim": {"lr": 3e-3, "scheduler": "constant"},
            "train": {"batch_size": 16, "max_steps": steps, "progress": False},
            **over,
        },
    }


# ----------------------------------------------------------------------------------------------- parsing
def test_stage_commands_match_the_cli_table():
    """Every command a stage may run is the CLI's own (same config class, same entry point)."""
    for name, (cls_path, target) in STAGE_COMMANDS.items():
        if name in ("select", "annotate", "heron", "implicit_search"):  # the recipe's own data steps
            continue
        cls, cli_target, _ = COMMANDS[name]
        assert (f"{cls.__module__}:{cls.__name__}", cli_target) == (cls_path, target)


def test_references_resolve_to_earlier_stage_directories_and_errors_name_the_stage():
    outs = {"sft": "/r/sft"}
    assert resolve("${stages.sft.output}/model", "rm", outs, "/r") == "/r/sft/model"
    assert resolve("${output_dir}/x", "rm", outs, "/r") == "/r/x"
    with pytest.raises(
        ConfigError,
        match=r"stage 'rm': \$\{stages.dpo.output\} names no earlier stage; earlier "
        r"stages: sft",
    ):
        resolve("${stages.dpo.output}/model", "rm", outs, "/r")
    with pytest.raises(ConfigError, match="is not a reference a recipe knows"):
        resolve("${stages.sft.model}", "rm", outs, "/r")


@pytest.mark.parametrize(
    "stages,message",
    [
        ([], "the recipe has no stages"),
        ([{"name": "a", "command": "sft"}, {"name": "a", "command": "rm"}], "'a' is used by an earlier stage"),
        ([{"name": "a", "command": "train"}], r"stage 'a'.command: 'train' is not one of sft, ift, rm"),
        ([{"name": "a", "command": "sft", "steps": 3}], r"stages\[0\]: unknown key\(s\) steps"),
        ([{"name": "a b", "command": "sft"}], "letters, digits"),
        ([{"name": "a"}], "stage 'a': no command"),
    ],
)
def test_bad_stage_lists_are_one_line_errors(stages, message):
    with pytest.raises(ConfigError, match=message):
        parse_stages(RecipeConfig(stages=stages))


def test_a_bad_key_in_a_later_stage_stops_the_recipe_before_any_stage_runs(tmp_path):
    cfg = load_config(
        RecipeConfig,
        _recipe(
            tmp_path,
            [
                {"name": "sft", "config": str(ROOT / "configs/sft.yaml")},
                {"name": "rm", "config": str(ROOT / "configs/rm.yaml"), "overrides": {"train.max_step": 3}},
            ],
        ),
    )
    with pytest.raises(ConfigError, match=r"stage 'rm' \(rm\): command line: unknown config key 'train.max_step'"):
        plan(cfg, tmp_path / "out")
    cfg.stages[1]["overrides"] = {"train.output_dir": "elsewhere"}
    with pytest.raises(ConfigError, match="stage 'rm': train.output_dir is set by the recipe"):
        plan(cfg, tmp_path / "out")


def test_command_line_overrides_reach_their_stage_and_all_stages_keys_only_where_they_exist(tmp_path):
    cfg = load_config(
        RecipeConfig,
        _recipe(
            tmp_path,
            [
                {"name": "sft", "config": str(ROOT / "configs/sft.yaml")},
                {
                    "name": "rm",
                    "config": str(ROOT / "configs/rm.yaml"),
                    "overrides": {"model.name_or_path": "${stages.sft.output}/model"},
                },
                {"name": "ev", "command": "eval", "overrides": {"policy": "${stages.sft.output}/model"}},
            ],
        ),
        ["stage.rm.train.max_steps=7", "all_stages.train.progress=false", "all_stages.task.hidden_size=32"],
    )
    sft, rm, ev = plan(cfg, tmp_path / "out")
    assert rm.cfg.train.max_steps == 7 and sft.cfg.train.max_steps == 400  # sft keeps its preset's value
    assert rm.cfg.model.name_or_path == str(tmp_path / "out" / "sft" / "model")
    assert sft.cfg.train.output_dir == str(tmp_path / "out" / "sft") and ev.cfg.output_dir == str(tmp_path / "out/ev")
    assert not sft.cfg.train.progress and not rm.cfg.train.progress  # eval has no train section: not touched
    assert sft.cfg.task.hidden_size == rm.cfg.task.hidden_size == ev.cfg.task.hidden_size == 32
    with pytest.raises(ConfigError, match="all_stages: no stage's config has the key"):
        plan(load_config(RecipeConfig, tmp_path / "recipe.yaml", ["all_stages.train.nope=1"]), tmp_path / "out")
    with pytest.raises(ConfigError, match="stage 'dpo' \\(in stage.\\* or rerun\\) is not a stage"):
        plan(load_config(RecipeConfig, tmp_path / "recipe.yaml", ["stage.dpo.train.max_steps=1"]), tmp_path / "out")


# ----------------------------------------------------------------------------------------------- running
def _recipe_proc(path: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "alignflow.cli", "recipe", "--config", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )


def test_a_recipe_killed_in_its_second_stage_resumes_there(reviews_task, tmp_path, capsys, caplog):
    """SIGKILL while stage 2 trains (after its checkpoint of step 2): the re-run skips stage 1 (its model is not
    written again), resumes stage 2 from its checkpoint, and finishes it; a third run skips both; changing a
    finished stage's key is refused until rerun names it."""
    path = _recipe(
        tmp_path,
        [
            _sft_stage(reviews_task, "first", 2),
            {
                **_sft_stage(reviews_task, "second", 24),
                "overrides": {
                    **_sft_stage(reviews_task, "second", 24)["overrides"],
                    "model": {"name_or_path": "${stages.first.output}/model"},
                    "train": {"batch_size": 16, "max_steps": 24, "save_every": 2, "progress": False},
                },
            },
        ],
    )
    out = tmp_path / "out"
    proc = _recipe_proc(path)
    deadline = time.time() + 300
    while not [
        p for p in (out / "second" / "checkpoints").glob("step-*/trainer_state.json") if p.parent.name[5:].isdigit()
    ]:  # a finished checkpoint, not one being written (step-N.tmp-PID)
        assert proc.poll() is None, "the recipe ended before stage 2 wrote a checkpoint"
        assert time.time() < deadline, "no stage-2 checkpoint after 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((out / "recipe.json").read_text())["stages"]
    assert state["first"]["status"] == "done" and state["second"]["status"] == "running"
    assert not (out / "second" / "model").exists()
    first_model = (out / "first" / "model" / "model.safetensors").stat().st_mtime_ns

    caplog.set_level(logging.INFO, logger="alignflow")
    assert main(["recipe", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "1 stage(s) run, 1 skipped" in printed
    assert "stage 1/2 'first' (sft) done in an earlier run, skipped" in caplog.text
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from")]
    assert len(resumed) == 1 and "second" in resumed[0] and not resumed[0].endswith("at step 0")
    assert (out / "first" / "model" / "model.safetensors").stat().st_mtime_ns == first_model
    assert (out / "second" / "model").is_dir()
    steps = [
        json.loads(line)["step"]
        for line in (out / "second" / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert steps[-1] == 24 and steps == sorted(set(steps))  # each step logged once across the two processes

    assert main(["recipe", "--config", str(path)]) == 0
    assert "0 stage(s) run, 2 skipped" in capsys.readouterr().out
    assert main(["recipe", "--config", str(path), "stage.first.optim.lr=1e-3"]) == 2
    assert "stage 'first': " in capsys.readouterr().err
