"""``alignflow refuel``: the command row and its help, one-line refusals, rows from data.path, a short run that
logs its metrics, evaluates before and after and exports the model, and a killed run that resumes to the same end.
(Its learning is checked on the preset by tests/test_presets_learn.py; the maths of the step by
tests/test_refuel_multiturn.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from alignflow import cli
from alignflow.config import ConfigError, RefuelConfig, from_dict
from alignflow.envs.base import load_env_factory
from alignflow.trainers import refuel
from alignflow.trainers.refuel import check, evaluate, load_rows, train_refuel


def _cfg(out, **sections) -> RefuelConfig:
    base = {
        "train": {"output_dir": str(out), "max_steps": 2, "progress": False, "log_every": 1},
        "refuel": {"episodes_per_step": 4, "eval_episodes": 4},
        "warm_start": {"sft_steps": 30, "conversations": 200},
        "task": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64},
    }
    for k, v in sections.items():
        base[k] = base.get(k, {}) | v
    return from_dict(RefuelConfig, base)


def test_refuel_is_a_command_with_help(capsys):
    assert cli.COMMANDS["refuel"][0] is RefuelConfig
    assert cli.main(["refuel", "--help"]) == 0
    out = capsys.readouterr().out
    assert "refuel.episodes_per_step" in out and "warm_start.sft_steps" in out


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"env": {"path": "my_env.py:make_env"}}, "model.name_or_path: the built-in warm start is for env.path="),
        (
            {"env": {"path": "my_env.py:make_env"}, "model": {"name_or_path": "some/model"}},
            "data.path: give the rows of env.path=my_env.py:make_env",
        ),
    ],
)
def test_refusals_name_the_key(tmp_path, sections, needle):
    with pytest.raises(ConfigError, match=needle):
        check(_cfg(tmp_path, **sections))


def test_rows_come_from_data_path(tmp_path):
    """Rows of data.path are handed to the environment as they are; a non-object row names its place."""
    good = tmp_path / "rows.jsonl"
    good.write_text('{"prompt": "3"}\n{"prompt": "7", "extra": 1}\n')
    assert load_rows(_cfg(tmp_path, data={"path": str(good)})) == [{"prompt": "3"}, {"prompt": "7", "extra": 1}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "3"}\n[1, 2]\n')
    with pytest.raises(ConfigError, match="a row must be an object"):
        load_rows(_cfg(tmp_path, data={"path": str(bad)}))


def test_short_run_logs_evaluates_and_exports(tmp_path):
    """2 steps of 4 roll-ins after a 30-step warm start of the built-in model: every step logs the refuel/* metrics,
    eval/ runs at step 0 and at the end, the logged rows are the returned ones, the final evaluation is that of the
    exported weights (seeded sampling: evaluating them again draws the same episodes), and the model is exported."""
    cfg = _cfg(tmp_path / "run")
    res = train_refuel(cfg)
    assert len(res.history) == 2 and [s for s, _ in res.evals] == [0, 2]
    for m in res.history:
        assert {"refuel/loss", "refuel/episode_return_mean", "refuel/rollin_ended", "refuel/grad_norm"} <= set(m)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 2]
    for row, m in zip(rows[1:3], res.history, strict=True):
        assert {k: row[k] for k in m} == pytest.approx(m)
    assert {k: rows[3][k] for k in res.eval} == pytest.approx(res.eval)
    make_env = load_env_factory(cfg.env.path, **cfg.env.kwargs)
    assert evaluate(res.model, res.tokenizer, make_env, load_rows(cfg), cfg) == pytest.approx(res.eval)
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """4 steps, a checkpoint every 2. Run A is uninterrupted. Run B dies inside step 3 (after the step-2
    checkpoint); run B again with train.resume=true goes on from step 2, reuses B's warm start (not trained
    again) and ends with exactly A's weights and A's metrics.jsonl rows: the checkpoint holds the weights, the
    AdamW moments, the schedule and both RNGs, and a step's rows and sampling seed follow from its number."""
    sections = dict(
        train={"max_steps": 4, "save_every": 2, "num_threads": 1},
        warm_start={"sft_steps": 5, "conversations": 50},
        refuel={"episodes_per_step": 4, "eval_episodes": 2},
    )
    a = train_refuel(_cfg(tmp_path / "a", **sections))
    real = refuel.refuel_iteration

    def dies_in_step_3(*args):
        if args[7] == 3:  # the step number
            raise RuntimeError("killed")
        return real(*args)

    monkeypatch.setattr(refuel, "refuel_iteration", dies_in_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        train_refuel(_cfg(tmp_path / "b", **sections))
    monkeypatch.setattr(refuel, "refuel_iteration", real)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-2"]
    warm = tmp_path / "b" / "warm_start" / "sft" / "model" / "model.safetensors"
    written = warm.stat().st_mtime_ns
    resumed = _cfg(tmp_path / "b", **sections)
    resumed.train.resume = True
    b = train_refuel(resumed)
    assert warm.stat().st_mtime_ns == written and len(b.history) == 2 and [s for s, _ in b.evals] == [4]
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    rows = [(tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in ("a", "b")]
    assert rows[0] == rows[1] and len(rows[0]) == 6  # eval at 0, steps 1-4, eval at 4
