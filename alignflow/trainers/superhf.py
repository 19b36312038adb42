"""``alignflow superhf``: RL from rewards with a supervised-style update (docs/superhf.md). Shared pieces with
A-LoL are in :mod:`alignflow.trainers.offline_common`.

**SuperHF** (Mukobi et al. 2023, "Superhuman feedback"; ``alignflow superhf``), one step::

    prompts = next rollout.prompts_per_step prompts                       (paper: 2)
    batch   = rollout.generate(prompts)                                   n = 16 each, temperature 1, top-p 0.95
    R       = reward.score(batch);  y* = top-k of each prompt's n by R     (paper: top-1)
    for each train.batch_size rows of y*:  minimise  CE(y*) + β·max(0, KL_tok(π_0 ‖ π_θ))     β = 0.35

KL_tok is the full-vocabulary forward KL ``Σ_v π_0(v)·[log π_0(v) − log π_θ(v)]`` averaged over the completion
tokens; π_0 is the initial policy (a frozen copy, or under LoRA the policy with its adapters disabled: no copy).

Departure, on purpose:
* SuperHF's prior logits come from a second forward per micro-batch (no cached (B, T, V) tensors); the loss needs
  full-vocabulary logits, so lower ``train.micro_batch_tokens`` for a large vocabulary.

Run:  ``alignflow superhf --config configs/superhf.yaml`` (``docs/superhf.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
from torch import nn

from alignflow.algorithms.offline import (
    superhf_loss,
    superhf_select,
)
from alignflow.batch import Batch
from alignflow.config import ConfigError, SuperHFConfig
from alignflow.data.pipeline import prepare_data
from alignflow.models import load_causal_lm
from alignflow.trainers import loop
from alignflow.trainers.offline_common import (
    OfflineRLResult,
    _reward,
    prompt_step_loop,
    reference_mode,
    response_logits,
)
from alignflow.trainers.rl import evaluate
from alignflow.trainers.rl_setup import Roles, _frozen_cfg
from alignflow.trainers.roles import (
    Optimised,
    RewardRole,
    Rollout,
    micro_batches,
)
from alignflow.trainers.setup import resolve_builtin, start_run, task_gold

log = logging.getLogger("alignflow.superhf")


# ----------------------------------------------------------------------------------------------- SuperHF
@dataclasses.dataclass
class SuperHFRun:
    """What one SuperHF step needs: the policy, the prior π_0 (None at β = 0), rollout and reward roles."""

    cfg: SuperHFConfig
    policy: nn.Module
    prior: nn.Module | None
    shared_prior: bool
    rollout: Rollout
    reward: RewardRole
    optim: Optimised | None
    device: torch.device


def sample_and_select(run: SuperHFRun, prompts: Batch) -> tuple[Batch, dict]:
    """Sample n completions per prompt, score them, keep the top ``superhf.keep`` of each: (kept rows, metrics)."""
    n, k = run.cfg.rollout.n, run.cfg.superhf.keep
    t0 = time.perf_counter()
    batch = run.rollout.generate(prompts)  # (P*n) rows; rows i*n .. i*n+n-1 are prompt i's
    gen_s = time.perf_counter() - t0
    rewards = run.reward.score(batch)["scores"].float().cpu().view(-1, n)  # (P, n)
    top = superhf_select(rewards, k)  # (P, k)
    rows = (top + torch.arange(rewards.shape[0])[:, None] * n).flatten()  # (P*k,)
    m = {
        "superhf/reward_mean": float(rewards.mean()),
        "superhf/reward_best": float(rewards.gather(1, top).mean()),
        "superhf/reward_std": float(rewards.std(dim=1, unbiased=False).mean()),
        "perf/gen_s": gen_s,
        "superhf/response_len": float(batch["response_mask"].sum(-1).float().mean()),
    }
    return batch.select(rows), m


def superhf_backward(run: SuperHFRun, kept: Batch) -> dict:
    """Forward/backward of the SuperHF loss on ``kept`` (one optimiser step's rows); gradients are left in ``.grad``.
    Returns the loss terms as 0-d tensors: ``loss``, ``nll`` (CE token mean), ``kl`` (KL token mean)."""
    cfg = run.cfg
    mask = kept["response_mask"]
    n_tok = float(max(int(mask.sum()), 1))
    totals = {"loss": 0.0, "nll": 0.0, "kl": 0.0}
    run.policy.train()
    for _, mb, pw in micro_batches(kept, cfg.train.micro_batch_tokens):
        with loop.autocast(run.device, cfg.train.mixed_precision):
            logits = response_logits(run.policy, mb, pw)  # (b, rw, V)
            if run.prior is None:  # β = 0: no prior is loaded; the KL term is 0 exactly
                ref = logits.detach()
            else:
                with reference_mode(run.prior, run.shared_prior):
                    ref = response_logits(run.prior, mb, pw)  # (b, rw, V)
            loss, m = superhf_loss(
                logits, ref, mb["response_ids"], mb["response_mask"], beta=cfg.superhf.beta, global_tokens=n_tok
            )
        loss.backward()
        share = float(mb["response_mask"].sum()) / n_tok  # metrics are token means of the micro-batch
        totals["loss"] = totals["loss"] + loss.detach()
        totals["nll"] = totals["nll"] + m["superhf/ce"] * share
        totals["kl"] = totals["kl"] + m["superhf/kl"] * share
    return totals


def superhf_step(run: SuperHFRun, prompts: Batch, step: int) -> dict:
    """One SuperHF step (the algorithm box of the module docstring); returns its metrics."""
    t0 = time.perf_counter()
    kept, m = sample_and_select(run, prompts)
    sums: dict = {}
    parts = kept.split(run.cfg.train.batch_size)
    for i, mb in enumerate(parts):
        terms = superhf_backward(run, mb)
        out = run.optim.step({"superhf_loss": terms["loss"]}, f"{step} (mini-batch {i})")
        for key, v in [(f"superhf/{k}", float(v)) for k, v in terms.items()] + list(out.items()):
            sums[key] = sums.get(key, 0.0) + v / len(parts)
    step_s = time.perf_counter() - t0
    return m | {k if "/" in k else f"train/{k}": v for k, v in sums.items()} | {"perf/step_s": step_s}


def build_superhf_run(cfg: SuperHFConfig, device, tok, total_opt_steps: int) -> SuperHFRun:
    policy = load_causal_lm(cfg.model, device)
    policy.train()
    prior, shared = None, False
    if cfg.superhf.beta > 0:
        if cfg.model.lora.enabled:
            prior, shared = policy, True
        else:
            prior = load_causal_lm(_frozen_cfg(cfg, cfg.model.name_or_path), device).requires_grad_(False).eval()
    rollout = Rollout(policy, tok, cfg.rollout, device, cfg.train.mixed_precision, cfg.train.seed)
    reward = _reward(cfg, cfg.task.name, device, tok.pad_token_id, required=True)
    optim = Optimised(policy, cfg.optim, cfg.train, total_opt_steps)
    return SuperHFRun(cfg, policy, prior, shared, rollout, reward, optim, device)


def train_superhf(cfg: SuperHFConfig) -> OfflineRLResult:
    """Run SuperHF as configured (``alignflow superhf``); returns the policy, per-step metrics and the final eval."""
    if cfg.superhf.keep > cfg.rollout.n:
        raise ConfigError(f"superhf.keep={cfg.superhf.keep} exceeds rollout.n={cfg.rollout.n} (samples per prompt)")
    art = resolve_builtin(cfg, "rl")
    if art is not None and not cfg.data.eval_path:
        cfg.data.eval_path = str(art.eval_prompts_path)
    out, device, tok = start_run(cfg)
    data = prepare_data(cfg.data, tok, expect=("prompt",), seed=cfg.train.seed)
    P = cfg.rollout.prompts_per_step
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * len(data.train) / P))
    run = build_superhf_run(cfg, device, tok, total * math.ceil(P * cfg.superhf.keep / cfg.train.batch_size))
    roles = Roles(rollout=run.rollout, actor=None, reward=run.reward)
    gold = task_gold(cfg, art)
    return prompt_step_loop(
        cfg,
        out,
        tok,
        data,
        total,
        run.optim,
        lambda prompts, step: superhf_step(run, prompts, step),
        lambda prompts: evaluate(roles, prompts, gold),
        "superhf/reward_best",
    )
