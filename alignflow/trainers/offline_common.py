"""What the SuperHF and A-LoL trainers share (:mod:`alignflow.trainers.superhf`, :mod:`alignflow.trainers.alol`):
their result type, their reward sources, the reference forward mode and the response logits."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError
from alignflow.models import get_lm_head, hidden_states, unwrap
from alignflow.trainers.rl_setup import build_sources, prompt_batch
from alignflow.trainers.roles import (
    RewardRole,
    eval_mode,
)

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
