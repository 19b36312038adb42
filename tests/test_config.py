"""Config loading: presets, overrides, and errors that name the key and the valid choices."""

import dataclasses
from pathlib import Path

import pytest

from alignflow.algorithms.preference_table import PREFERENCE_LOSSES
from alignflow.cli import COMMANDS
from alignflow.config import (
    RL_ALGORITHMS,
    ConfigError,
    DemoConfig,
    EvalConfig,
    OnlinePOConfig,
    POConfig,
    RLConfig,
    RMConfig,
    SFTConfig,
    from_dict,
    load_config,
    parse_overrides,
)

ROOT = Path(__file__).resolve().parents[1]


def _preset_class(path: Path):
    """configs/<name>.yaml -> the config class of the command it is a preset for (its ``command:`` key, else the
    naming conventions)."""
    import yaml

    command = (yaml.safe_load(path.read_text()) or {}).get("command")
    if command in COMMANDS:
        return COMMANDS[command][0]
    name = path.stem
    if name in RL_ALGORITHMS:  # configs/<algo.name>.yaml are `alignflow rl` presets
        return RLConfig
    if name in ("online_dpo", "inpo", "apo", "nash_md"):  # `alignflow online_po` presets (inpo is also a loss name)
        return OnlinePOConfig
    if name in PREFERENCE_LOSSES:  # configs/<loss.name>.yaml are `alignflow po` presets
        return POConfig
    for prefix, cls in (("sft", SFTConfig), ("rm", RMConfig), ("eval", EvalConfig), ("demo", DemoConfig)):
        if name.startswith(prefix):
            return cls
    return None


PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads(path):
    cls = _preset_class(path)
    if cls is None:  # presets of commands added by later modules register themselves in the CLI table
        cls = next(c for cmd, (c, _, _) in COMMANDS.items() if path.stem.startswith(cmd))
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)


def test_presets_cover_sft_and_rm():
    names = {p.stem for p in PRESETS}
    assert {"sft", "rm", "rm_ensemble", "rm_multiobjective", "demo", "eval"} <= names


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        SFTConfig,
        ROOT / "configs/sft.yaml",
        [
            "optim.lr=3e-4",
            "train.packing=false",
            "model.lora.enabled=true",
            "model.lora.r=4",
            "model.lora.target_modules=q_proj,v_proj",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.packing is False
    assert cfg.model.lora.enabled and cfg.model.lora.r == 4
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, ["optim.learning_rate=1"])
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "lr" in msg and "weight_decay" in msg


def test_unknown_section_in_yaml_names_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, bad)
    assert "bad.yaml" in str(e.value) and "optimizer" in str(e.value) and "optim" in str(e.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data.on_bad_row=ignore", "error, skip"),
        ("train.batch_size=0", "allowed range"),
        ("optim.lr=fast", "expected a number"),
        ("train.packing=maybe", "true/false"),
        ("data.eval_fraction=0.9", "allowed range"),
    ],
)
def test_bad_values_fail_at_load_time(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, [override])
    assert needle in str(e.value) and override.split("=")[0] in str(e.value)


def test_every_field_has_a_doc():
    """Every dataclass defined in the alignflow.config package (every command's schema and every shared section),
    field by field."""
    import alignflow.config as config_module

    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default))

    classes = [
        c
        for c in vars(config_module).values()
        if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__.startswith(config_module.__name__ + ".")
    ]
    assert {SFTConfig, RMConfig, EvalConfig, DemoConfig, RLConfig} <= set(classes)
    for cls in classes:
        walk(cls)


def test_parse_overrides_rejects_missing_equals():
    with pytest.raises(ConfigError):
        parse_overrides(["optim.lr"])


def test_from_dict_validates():
    with pytest.raises(ConfigError):
        from_dict(RMConfig, {"reward": {"aggregation": "max"}})
    assert from_dict(RMConfig, {"reward": {"aggregation": "min"}}).reward.aggregation == "min"


def test_list_items_are_converted_to_their_declared_type():
    """``list[float]`` fields from the command line hold numbers, not the strings the shell gave; a bad item names
    its index."""
    from alignflow.config import ConfigError, RLConfig, load_config

    cfg = load_config(RLConfig, None, ["algo.filter_range=0.2,0.8"])
    assert cfg.algo.filter_range == [0.2, 0.8] and all(isinstance(v, float) for v in cfg.algo.filter_range)
    with pytest.raises(ConfigError, match=r"algo.filter_range\[0\]: expected a number"):
        load_config(RLConfig, None, ["algo.filter_range=a,0.8"])


def test_each_command_schema_lives_in_a_module_named_as_the_command():
    """The config is split by owner: ``alignflow <cmd>``'s schema is ``alignflow.config.<cmd>`` (merge and
    merge_models share ``config/merge.py``; a recipe's schema lives with the recipe runner)."""
    from alignflow.cli import COMMANDS

    for name, (cls, _, _) in COMMANDS.items():
        expected = {"merge_models": "merge", "recipe": None}.get(name, name)
        if expected is None:
            continue
        assert cls.__module__ == f"alignflow.config.{expected}", (name, cls.__module__)
        assert (cls.__doc__ or "").lstrip().startswith(f"``alignflow {name}"), name


def test_each_command_runs_a_module_named_as_the_command():
    """Trainers are cut by command: the entry point of ``alignflow <cmd>`` is in a module called ``<cmd>``
    (trainers/, recipes/ for multi-stage pipelines, eval/ and rewards/serve.py for the two that train nothing)."""
    from alignflow.cli import COMMANDS

    for name, (_, target, _) in COMMANDS.items():
        module = target.split(":")[0]
        assert module.rsplit(".", 1)[1] in (name, {"eval": "evaluate", "recipe": "runner"}.get(name)), (name, module)


def test_rl_algorithm_choices_are_the_algorithm_table():
    """config/rl.py sits below the trainers, so it keeps the valid ``algo.name`` values as a copy of the AlgoSpec
    table's keys (docs/design.md, "An online-RL algorithm"); the copy must not drift from the table."""
    from alignflow.trainers.rl_algos import ALGORITHMS

    assert sorted(RL_ALGORITHMS) == sorted(ALGORITHMS)


def test_rl_help_lists_the_algorithm_table(capsys):
    """``alignflow rl --help`` names every AlgoSpec row, read from the table (a new row needs no CLI edit)."""
    from alignflow.cli import main
    from alignflow.trainers.rl_algos import ALGORITHMS

    assert main(["rl", "--help"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert all(name in first.split("one of: ")[1].split(", ") for name in ALGORITHMS)
