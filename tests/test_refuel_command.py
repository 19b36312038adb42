"""``alignflow refuel``: the command row and its help, one-line refusals, rows from data.path, and a short run that
logs its metrics, evaluates before and after and exports the model. (Its learning is checked on the preset by
tests/test_presets_learn.py; the maths of the step by tests/test_refuel_multiturn.py.)"""

from __future__ import annotations

import json

import pytest

from alignflow import cli
from alignflow.config import ConfigError, RefuelConfig, from_dict
from alignflow.envs.base import load_env_factory
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
        ({"train": {"resume": True}}, "train.resume: alignflow refuel writes no checkpoints"),
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
