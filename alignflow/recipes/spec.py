"""What a recipe file says: its config (``RecipeConfig``), its stages, and how a stage's overrides are resolved.

A recipe is a YAML file with ``command: recipe`` and a list of ``stages``; each stage runs one alignflow command
(or one of the recipe's own data steps) with a preset (``config``) and ``overrides``. An override value may name
an earlier stage's run directory, ``${stages.<name>.output}``, or the recipe's own, ``${output_dir}``; that is how
one stage's model or data feeds the next. Nothing here imports torch: the command line reads this module before
any run starts. The runner is ``alignflow.recipes.runner``; the format is documented in ``docs/recipes.md``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from alignflow.config import ConfigError, field

# command -> (config class in alignflow.config.<command> or alignflow.recipes.steps, entry point "module:function")
STAGE_COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("alignflow.config.sft:SFTConfig", "alignflow.trainers.sft:train_sft"),
    "ift": ("alignflow.config.ift:IFTConfig", "alignflow.trainers.ift:train_ift"),
    "rm": ("alignflow.config.rm:RMConfig", "alignflow.trainers.rm:train_rm"),
    "pm": ("alignflow.config.pm:PMConfig", "alignflow.trainers.pm:train_pm"),
    "rl": ("alignflow.config.rl:RLConfig", "alignflow.trainers.rl:train_rl"),
    "po": ("alignflow.config.po:POConfig", "alignflow.trainers.po:train_po"),
    "online_po": ("alignflow.config.online_po:OnlinePOConfig", "alignflow.trainers.online_po:train_online_po"),
    "superhf": ("alignflow.config.superhf:SuperHFConfig", "alignflow.trainers.superhf:train_superhf"),
    "alol": ("alignflow.config.alol:ALoLConfig", "alignflow.trainers.alol:train_alol"),
    "mpo": ("alignflow.config.mpo:MPOConfig", "alignflow.recipes.mpo:train_mpo"),
    "eval": ("alignflow.config.eval:EvalConfig", "alignflow.eval.evaluate:run_eval"),
    # the recipe's own data steps (not commands of their own): alignflow/recipes/steps.py
    "select": ("alignflow.recipes.steps:SelectConfig", "alignflow.recipes.steps:select_rows"),
    "annotate": ("alignflow.recipes.steps:AnnotateConfig", "alignflow.recipes.steps:annotate"),
    "heron": ("alignflow.recipes.steps:HeronConfig", "alignflow.recipes.steps:heron"),
    "implicit_search": ("alignflow.recipes.steps:ImplicitSearchConfig", "alignflow.recipes.steps:implicit_search"),
}
STAGE_KEYS = ("name", "command", "config", "overrides", "about")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_REF = re.compile(r"\$\{([^}]*)\}")


@dataclasses.dataclass
class RecipeConfig:
    """``alignflow recipe``: run a list of stages (alignflow commands) whose outputs feed the next ones, resumable
    stage by stage (docs/recipes.md). ``stage.<name>.<key>=value`` overrides one stage's key from the command line."""

    name: str = field("", doc="The recipe's name (shown in its log lines and recipe.json).")
    about: str = field("", doc="One line on what the recipe reproduces.")
    output_dir: str = field(
        "runs/recipe",
        doc="Recipe directory: each stage runs in <output_dir>/<stage name>; recipe.json records the stages done.",
    )
    stages: list[dict[str, Any]] = field(
        default_factory=list,
        doc="The stages, in order: each a mapping with name, "
        "command, config (a preset), overrides "
        "(key: value; ${stages.<name>.output} is an "
        "earlier stage's run directory).",
    )
    stage: dict[str, Any] = field(
        default_factory=dict, doc="Overrides by stage name, from the command line: stage.sft.train.max_steps=5."
    )
    all_stages: dict[str, Any] = field(
        default_factory=dict, doc="Overrides for every stage whose config has the key: all_stages.train.progress=false."
    )
    rerun: list[str] = field(
        default_factory=list, doc="Stages to run again although done (every later stage runs again too)."
    )


@dataclasses.dataclass
class Stage:
    """One resolved stage: its command, its preset and its overrides as ``key=value`` strings."""

    name: str
    command: str
    config: str
    overrides: list[str]
    about: str = ""


def flatten(mapping: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"max_steps": 5}, "optim.lr": 1e-3}`` -> ``{"train.max_steps": 5, "optim.lr": 1e-3}``."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of key: value, got {mapping!r}")
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, where, dotted + ".")
        else:
            out[dotted] = value
    return out


def as_text(value: Any) -> str:
    """A YAML value as the command line would write it (lists and mappings as JSON, which YAML reads back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _command_of(raw: dict, where: str) -> str:
    """The stage's command: its ``command`` key, else the ``command:`` key of its preset."""
    command = raw.get("command")
    if command is None and raw.get("config"):
        from pathlib import Path

        import yaml

        path = Path(str(raw["config"]))
        if path.is_file():
            command = (yaml.safe_load(path.read_text()) or {}).get("command")
    if command is None:
        raise ConfigError(
            f"{where}: no command (give command: one of {', '.join(STAGE_COMMANDS)}, or a config "
            "preset with a command: key)"
        )
    if command not in STAGE_COMMANDS:
        raise ConfigError(f"{where}.command: {command!r} is not one of {', '.join(STAGE_COMMANDS)}")
    return str(command)


def parse_stages(cfg: RecipeConfig) -> list[Stage]:
    """Check the stages of ``cfg`` and apply its ``stage.*`` and ``all_stages.*`` overrides (their values are
    resolved later, stage by stage). ConfigError names the stage and the key."""
    if not cfg.stages:
        raise ConfigError("stages: the recipe has no stages; give a list of {name, command, config, overrides}")
    stages: list[Stage] = []
    for i, raw in enumerate(cfg.stages):
        where = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with keys {', '.join(STAGE_KEYS)}, got {raw!r}")
        unknown = sorted(set(raw) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(STAGE_KEYS)}")
        name = str(raw.get("name", ""))
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{where}.name: {name!r} -- give each stage a name of letters, digits, _ and -")
        if name in [s.name for s in stages]:
            raise ConfigError(f"{where}.name: {name!r} is used by an earlier stage; stage names must be unique")
        where = f"stage '{name}'"
        overrides = flatten(raw.get("overrides") or {}, f"{where}.overrides")
        overrides |= flatten(cfg.stage.get(name) or {}, f"stage.{name}")
        stages.append(
            Stage(
                name,
                _command_of(raw, where),
                str(raw.get("config") or ""),
                [f"{k}={as_text(v)}" for k, v in overrides.items()],
                str(raw.get("about", "")),
            )
        )
    names = [s.name for s in stages]
    for name in list(cfg.stage) + list(cfg.rerun):
        if name not in names:
            raise ConfigError(
                f"stage '{name}' (in stage.* or rerun) is not a stage of this recipe; its stages: {', '.join(names)}"
            )
    return stages


def resolve(text: str, stage: str, outputs: dict[str, str], output_dir: str) -> str:
    """Replace ``${stages.<name>.output}`` (an earlier stage's directory) and ``${output_dir}`` in ``text``."""

    def sub(m: re.Match) -> str:
        ref = m.group(1).strip()
        if ref == "output_dir":
            return output_dir
        parts = ref.split(".")
        if len(parts) == 3 and parts[0] == "stages" and parts[2] == "output":
            if parts[1] in outputs:
                return outputs[parts[1]]
            raise ConfigError(
                f"stage '{stage}': ${{{ref}}} names no earlier stage; earlier stages: {', '.join(outputs) or '(none)'}"
            )
        raise ConfigError(
            f"stage '{stage}': ${{{ref}}} is not a reference a recipe knows; use "
            "${stages.<name>.output} or ${output_dir}"
        )

    return _REF.sub(sub, text)
