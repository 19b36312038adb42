"""Presets name their command (checked by the loader) and start from models a fresh clone can build."""

from pathlib import Path

import pytest
import yaml

from alignflow.cli import COMMANDS
from alignflow.config import ConfigError, RLConfig, SFTConfig, TaskConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_names_its_command_and_loads_for_it(path):
    data = yaml.safe_load(path.read_text())
    assert data["command"] in COMMANDS, f"{path.name}: command: {data['command']!r}"
    assert path.read_text().startswith(f"command: {data['command']}")
    load_config(COMMANDS[data["command"]][0], path)


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_no_preset_needs_a_model_that_a_fresh_clone_lacks(path):
    """A model path is empty (the built-in task's model), builtin:sft, or the model of the first stage of its
    pipeline: ``runs/<stage>/model`` where ``configs/<stage>.yaml`` writes ``runs/<stage>`` (thinkrm_grpo)."""
    model = (yaml.safe_load(path.read_text()).get("model") or {}).get("name_or_path", "")
    stage = ROOT / "configs" / f"{Path(model).parent.name}.yaml"
    if model.startswith("runs/") and model.endswith("/model") and stage.is_file():
        assert yaml.safe_load(stage.read_text())["train"]["output_dir"] == str(Path(model).parent), model
        return
    assert model in ("", "builtin:sft"), f"{path.name}: model.name_or_path={model!r}"


def test_wrong_command_is_one_clear_error():
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, ROOT / "configs" / "grpo.yaml")
    assert str(e.value) == (
        f"{ROOT / 'configs' / 'grpo.yaml'} is a preset for `alignflow rl` (its command: key), "
        f"not `alignflow sft`; run: alignflow rl --config {ROOT / 'configs' / 'grpo.yaml'}"
    )


def test_builtin_sft_is_built_once_and_shared(tmp_path):
    """builtin:sft trains the task's tiny model on first use, beside the run directory, and is reused."""
    from alignflow.trainers.builtin_sft import builtin_sft_model, resolve_model

    task = TaskConfig(
        hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, num_sft=64, num_pairs=8, sft_steps=2
    )
    cfg = load_config(
        RLConfig,
        None,
        ["model.name_or_path=builtin:sft", f"train.output_dir={tmp_path / 'ppo'}", "train.progress=false"],
    )
    cfg.task = task
    resolve_model(cfg)
    model = Path(cfg.model.name_or_path)
    assert model.parent.parent == tmp_path / "builtin-sft" and (model / "config.json").is_file()
    stamp = (model / "config.json").stat().st_mtime_ns
    assert builtin_sft_model(task, tmp_path / "rloo", progress=False) == model  # another preset: same model
    assert (model / "config.json").stat().st_mtime_ns == stamp


def test_reviews_rated_attributes_sum_to_the_gold_reward():
    from alignflow.tasks.reviews import attribute_ratings, gold_reward

    prompt, response = "Review : the plot", " was great great , and the cast"
    ratings = attribute_ratings(prompt, response)
    assert sorted(ratings) == ["fluency", "length", "sentiment", "variety"]
    assert sum(ratings.values()) == pytest.approx(gold_reward([prompt], [response])[0])
