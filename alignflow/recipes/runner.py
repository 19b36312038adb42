"""``alignflow recipe``: run a recipe's stages in order, each in ``<output_dir>/<stage name>``.

Every stage's config is loaded and checked before the first stage runs (a typo in the last stage stops the recipe
at once, not after hours of training). ``<output_dir>/recipe.json`` records each stage's state (``running`` or
``done``) with a fingerprint of its full config, which decides what a re-run does:

* ``done`` with the same fingerprint: skipped; its output feeds the later stages as before;
* ``done`` with another fingerprint: an error listing the changed keys (``rerun=[name]`` runs it again, and every
  later stage with it: their inputs change);
* ``running`` with the same fingerprint (the recipe was killed in it): run again with ``train.resume=true``, so the
  stage's trainer goes on from its last checkpoint (``train.save_every``); with another fingerprint the stage
  starts afresh and its old checkpoints are deleted.

A stage's run directory is the runner's: setting ``train.output_dir`` (or ``output_dir``) in a stage is an error.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from alignflow.config import ConfigError, load_config, to_dict
from alignflow.data.formats import DataError
from alignflow.recipes.spec import STAGE_COMMANDS, RecipeConfig, Stage, as_text, flatten, parse_stages, resolve
from alignflow.trainers.finish import finish, preflight
from alignflow.trainers.run_dir import check_output_dir

log = logging.getLogger("alignflow")

STATE = "recipe.json"
UNFINGERPRINTED = ("progress", "resume", "overwrite")  # keys that do not change what a stage computes


@dataclasses.dataclass
class Planned:
    """A stage with its loaded config, its run directory and its fingerprint."""

    stage: Stage
    cfg: Any
    output: Path
    flat: dict[str, Any]


def _import(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _has_key(cls: type, dotted: str) -> bool:
    """Whether the config class ``cls`` has the (dotted) key."""
    node: Any = cls()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def _fingerprint_view(cfg: Any) -> dict[str, Any]:
    """The config as flat ``key: value`` pairs without the keys that do not change the result."""
    flat = flatten(to_dict(cfg), "config")
    view = {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in UNFINGERPRINTED}
    return json.loads(json.dumps(view, default=str))  # as recipe.json will read it back


def _set_output(cfg: Any, out: Path) -> None:
    if hasattr(cfg, "output_dir"):
        cfg.output_dir = str(out)
    else:
        cfg.train.output_dir = str(out)


def _set_train_flags(cfg: Any, resume: bool) -> None:
    """``train.resume`` / ``train.overwrite`` on every training section of ``cfg`` (mpo has two)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if type(value).__name__ == "TrainConfig":
            value.resume, value.overwrite = resume, True
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            _set_train_flags(value, resume)


def plan(cfg: RecipeConfig, out: Path) -> list[Planned]:
    """Load every stage's config (preset, then its overrides with ``${...}`` resolved, then ``all_stages.*``)."""
    stages = parse_stages(cfg)
    shared = flatten(cfg.all_stages, "all_stages")
    used: set[str] = set()
    outputs: dict[str, str] = {}
    planned = []
    for st in stages:
        cls = _import(STAGE_COMMANDS[st.command][0])
        for item in st.overrides:
            if item.split("=", 1)[0] in ("output_dir", "train.output_dir"):
                raise ConfigError(
                    f"stage '{st.name}': {item.split('=', 1)[0]} is set by the recipe "
                    f"(<output_dir>/{st.name}); remove it from the stage"
                )
        extra = [f"{k}={as_text(v)}" for k, v in shared.items() if _has_key(cls, k)]
        used |= {item.split("=", 1)[0] for item in extra}
        resolved = [resolve(item, st.name, outputs, str(out)) for item in extra + st.overrides]
        try:
            stage_cfg = load_config(cls, resolve(st.config, st.name, outputs, str(out)) or None, resolved)
        except ConfigError as e:
            raise ConfigError(f"stage '{st.name}' ({st.command}): {e}") from None
        stage_out = out / st.name
        _set_output(stage_cfg, stage_out)
        outputs[st.name] = str(stage_out)
        planned.append(Planned(st, stage_cfg, stage_out, _fingerprint_view(stage_cfg)))
    unused = sorted(set(shared) - used)
    if unused:
        raise ConfigError(f"all_stages: no stage's config has the key(s) {', '.join(unused)}")
    return planned


def read_state(out: Path) -> dict[str, Any]:
    path = out / STATE
    if not path.is_file():
        return {"stages": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); delete it to run every stage again") from None
    return state if isinstance(state, dict) and isinstance(state.get("stages"), dict) else {"stages": {}}


def write_state(out: Path, state: dict[str, Any]) -> None:
    """Write recipe.json atomically (a kill leaves the old or the new file, never half of one)."""
    tmp = out / f".{STATE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, out / STATE)


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    shown = ", ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys[:4])
    return shown + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def decide(p: Planned, record: dict[str, Any] | None, forced: bool) -> str:
    """What to do with a stage: ``skip``, ``resume`` or ``run`` (module docstring)."""
    name = p.stage.name
    if record is None or forced:
        return "run"
    same = record.get("config") == p.flat
    if record.get("status") == "done":
        if same:
            return "skip"
        raise ConfigError(
            f"stage '{name}': {p.output} holds a finished run made with other settings "
            f"({_changed(record.get('config', {}), p.flat)}); add rerun=[{name}] to run it and the "
            f"later stages again, or choose another output_dir"
        )
    if not same:
        log.warning(
            "stage '%s': the run left in %s was made with other settings (%s); starting it afresh",
            name,
            p.output,
            _changed(record.get("config", {}), p.flat),
        )
        return "run"
    return "resume"


def run_stage(p: Planned, resume: bool) -> tuple[float, str]:
    """Run one stage as its command would (pre-flight checks, the entry point, Hub push); (seconds, summary)."""

    _set_train_flags(p.cfg, resume)
    t0 = time.perf_counter()
    try:
        preflight(p.cfg)
        _import(STAGE_COMMANDS[p.stage.command][1])(p.cfg)
    except (ConfigError, DataError) as e:  # one line that also names the stage
        raise type(e)(f"stage '{p.stage.name}' ({p.stage.command}): {e}") from None
    seconds = time.perf_counter() - t0
    return seconds, finish(p.stage.command, p.cfg, seconds) or f"done in {seconds:.0f} s; output at {p.output}"


def run_recipe(cfg: RecipeConfig) -> dict[str, dict[str, Any]]:
    """Run the recipe ``cfg``; returns, per stage, what happened (``ran``, ``resumed``, ``skipped``), its run
    directory and its seconds."""

    out = check_output_dir(cfg.output_dir, "output_dir")
    planned = plan(cfg, out)
    state = read_state(out)
    state["recipe"] = cfg.name
    first_rerun = min([i for i, p in enumerate(planned) if p.stage.name in cfg.rerun], default=len(planned))
    actions = [decide(p, state["stages"].get(p.stage.name), i >= first_rerun) for i, p in enumerate(planned)]
    title = f"recipe {cfg.name or out.name}"
    report: dict[str, dict[str, Any]] = {}
    for i, (p, action) in enumerate(zip(planned, actions, strict=True)):
        name = p.stage.name
        if action == "skip":
            log.info(
                "%s: stage %d/%d '%s' (%s) done in an earlier run, skipped",
                title,
                i + 1,
                len(planned),
                name,
                p.stage.command,
            )
            report[name] = {"status": "skipped", "output": str(p.output), "seconds": 0.0}
            continue
        log.info(
            "%s: stage %d/%d '%s' (%s)%s",
            title,
            i + 1,
            len(planned),
            name,
            p.stage.command,
            " resumed from its last checkpoint" if action == "resume" else "",
        )
        state["stages"][name] = {"status": "running", "command": p.stage.command, "config": p.flat}
        write_state(out, state)
        seconds, summary = run_stage(p, resume=action == "resume")
        state["stages"][name] |= {"status": "done", "seconds": round(seconds, 1)}
        write_state(out, state)
        print(f"{title}: stage '{name}': {summary}", flush=True)
        report[name] = {
            "status": "resumed" if action == "resume" else "ran",
            "output": str(p.output),
            "seconds": seconds,
        }
    ran = sum(r["status"] != "skipped" for r in report.values())
    print(
        f"alignflow recipe: {title} done; {ran} stage(s) run, {len(report) - ran} skipped; stages in {out}", flush=True
    )
    return report
