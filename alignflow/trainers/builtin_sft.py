"""``model.name_or_path: builtin:sft``: the built-in task's tiny model after supervised fine-tuning, built on first use.

Presets whose method starts from an SFT policy (PPO, GRPO, SuperHF, A-LoL, online DPO, ...) name this model, so
they run as written on a fresh clone: the first run fine-tunes the task's tiny model on the task's SFT corpus
(``task.sft_steps`` steps, default the task's own ``TaskSpec.sft_steps``) and caches it beside the run directory,
in ``<parent of train.output_dir>/builtin-sft/<task>-<key>/model`` (``runs/builtin-sft/...`` for the presets), so
that every preset of the same task and seed shares one SFT model. The key hashes everything the SFT depends on
(the task config, steps, learning rate, seed, the code of the task); a different key builds a new model.
"""

from __future__ import annotations

# The model is built by the SFT trainer, which also fine-tunes it further (model.name_or_path=builtin:sft of
# `alignflow sft`), so its code lives in trainers/sft.py; the names stay importable from here.
from alignflow.trainers.sft import BUILTIN_SFT, DONE, builtin_sft_model, resolve_model, sft_settings

__all__ = ["BUILTIN_SFT", "DONE", "builtin_sft_model", "resolve_eval_models", "resolve_model", "sft_settings"]


def resolve_eval_models(cfg) -> None:
    """``alignflow eval``: ``policy``, ``reference`` or a ``frontier`` entry equal to ``builtin:sft`` becomes the
    built-in SFT model of ``cfg.task`` (seed 0, as the presets build it; in place)."""
    names = [cfg.policy, cfg.reference, *cfg.frontier]
    if BUILTIN_SFT not in names:
        return
    model = str(builtin_sft_model(cfg.task, cfg.output_dir, 0, cfg.device))
    cfg.policy, cfg.reference = (model if n == BUILTIN_SFT else n for n in names[:2])
    cfg.frontier = [model if n == BUILTIN_SFT else n for n in cfg.frontier]
