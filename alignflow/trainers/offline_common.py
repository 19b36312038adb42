"""What the sampling trainers with supervised-style updates share (:mod:`alignflow.trainers.superhf`,
:mod:`alignflow.trainers.alol`, :mod:`alignflow.trainers.cgpo`): their result type, their reward sources, the
reference forward mode, the response logits, and SuperHF's and CGPO's step loop (:func:`prompt_step_loop`)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError
from alignflow.distributed.save import save_model
from alignflow.models import get_lm_head, hidden_states, unwrap
from alignflow.trainers import loop
from alignflow.trainers.rl_setup import PromptStream, build_sources, prompt_batch
from alignflow.trainers.roles import Optimised, RewardRole, eval_mode

log = logging.getLogger("alignflow.offline")


@dataclasses.dataclass
class OfflineRLResult:
    model: torch.nn.Module
    tokenizer: object
    history: list = dataclasses.field(default_factory=list)  # one metrics dict per step
    eval: dict = dataclasses.field(default_factory=dict)
    output_dir: Path = Path(".")
    stats: dict = dataclasses.field(default_factory=dict)  # A-LoL: value fit and filtering
    precomputed: dict = dataclasses.field(default_factory=dict)  # A-LoL: rewards, values, advantages (N,), keep


# ----------------------------------------------------------------------------------------------- shared pieces
def _reward(cfg, task_name: str, device, pad_id: int, required: bool) -> RewardRole | None:
    """The configured reward sources as a RewardRole (RL's ``reward:`` section shape)."""
    if cfg.reward.normalize != "none" or cfg.reward.clip:
        raise ConfigError(
            "reward.normalize / reward.clip are online-RL options; set them to none / 0 here "
            "(SuperHF ranks raw rewards, A-LoL subtracts a value fit to raw rewards)"
        )
    composite = build_sources(cfg.reward, "reward", task_name, cfg, device, pad_id)
    if composite is None and required:
        raise ConfigError("no reward source: set reward.task (e.g. {gold: 1.0}), reward.functions or reward.models")
    return RewardRole(composite) if composite is not None else None


@contextlib.contextmanager
def reference_mode(model, shared: bool):
    """π_ref / π_0 forward passes: no gradient, eval mode, and LoRA adapters off when the reference is the policy's
    base weights (``shared``)."""
    adapters_off = model.disable_adapter() if shared else contextlib.nullcontext()
    with torch.no_grad(), adapters_off, eval_mode(model):
        yield


def response_logits(model, mb: Batch, pw: int) -> torch.Tensor:
    """Float32 logits (b, rw, V) at the positions that predict the response tokens of a micro-batch."""
    h = hidden_states(model, mb["input_ids"], mb["attention_mask"], mb["position_ids"])  # (b, pw + rw, H)
    logits = get_lm_head(model)(h[:, pw - 1 : -1]).float()  # (b, rw, V): position pw + t - 1 predicts y_t
    softcap = getattr(unwrap(model).config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _eval_batch(rows: list[dict], limit: int, fields: list[str]) -> Batch:
    rows = rows[:limit]
    return prompt_batch(rows, [10**9 + i for i in range(len(rows))], fields)


def prompt_step_loop(
    cfg,
    out: Path,
    tok,
    data,
    total: int,
    optim: Optimised,
    step: Callable[[Batch, int], dict],
    evaluate: Callable[[Batch], dict],
    shown: str,
) -> OfflineRLResult:
    """The loop of a trainer that takes ``rollout.prompts_per_step`` fresh prompts per step (SuperHF, CGPO): resume
    the optimiser and the prompt position, then per step ``step(prompts, i)`` -> metrics, logged every
    ``train.log_every`` steps, ``evaluate(held-out prompts)`` every ``train.eval_every`` steps and at the end, a
    checkpoint as ``train.save_every`` says; finally the policy is exported to ``out/model``. ``shown`` is the
    metric on the progress bar, which is labelled with the command (the config's ``alignflow <cmd>``)."""
    stream = PromptStream(data.train, cfg.train.seed)
    state = loop.resume(out, cfg.train.resume, optim.load)
    start = int(state.get("step", 0))
    stream.position = int(state.get("prompt_position", 0))
    eval_prompts = _eval_batch(data.eval, cfg.rollout.eval_prompts, stream.fields)
    logger = loop.MetricsLogger(out, start=start)
    for r in data.reports:
        logger.log(start, {"data/report": r})
    bar = loop.Progress(total, start, cfg.train.progress, shown.split("/")[0])
    result = OfflineRLResult(optim.model, tok, output_dir=out)
    for i in range(start, total):
        m = step(stream.take(cfg.rollout.prompts_per_step), i)
        result.history.append(m)
        bar.update(0, reward=m[shown])
        if (i + 1) % cfg.train.log_every == 0 or i + 1 == total:
            logger.log(i + 1, m)
        if cfg.train.eval_every and (i + 1) % cfg.train.eval_every == 0 and i + 1 < total:
            logger.log(i + 1, evaluate(eval_prompts))
        loop.checkpoint_step(
            i + 1,
            total,
            cfg.train,
            out,
            lambda path, done=i + 1: optim.save(path, {"step": done, "prompt_position": stream.position}),
        )
    bar.close()
    result.eval = evaluate(eval_prompts)
    logger.log(total, result.eval)
    logger.close()
    save_model(optim.model, tok, out / "model")
    return result
