"""The ``pairwise`` advantage of ``alignflow rl`` (pairwise RLHF, ``docs/pairwise_rlhf.md``).

The reward role's pairwise source (:mod:`alignflow.rewards.pairwise`) leaves in the batch either each row's
preferences against its group (``pair_prefs`` (B, G_max) with ``pair_group_size``) or against an anchor
(``anchor_prefs`` (B,)). This step groups the rows by meta ``group`` and applies the pure functions of
:mod:`alignflow.algorithms.pairwise_adv`::

    group:   A_i = 1/(G-1) Σ_{j≠i} P[i, j] - 1/2
             (reward.pairwise.normalize: Think-RM's scale, (1/G) Σ_j d_ij / sqrt(Σ d² / (2G(G-1)) + ε), d = P - 1/2)
    anchor:  A_i = p_i - 1/2          (reward.pairwise.center: p_i - mean_group(p))

then adds the sequence's KL return ``-β Σ_t KL_t`` when the KL sits in the reward (0 with ``kl.placement:
loss``) and broadcasts the sequence advantage over the response's tokens. Only the pairwise source shapes the
advantage; other reward sources are logged (``rollout/reward_<name>_mean``) but do not enter it.

With ``reward.pairwise.anchor: greedy`` the anchor is the current policy's greedy response to the prompt (as in
Pairwise-RL): :func:`greedy_anchors` decodes it with the rollout role right after the step's samples, before the
reward role scores them, and gives it to every sample of the prompt (meta ``pairwise_greedy``).
"""

from __future__ import annotations

import torch

from alignflow.algorithms.advantages import broadcast_to_tokens
from alignflow.algorithms.kl import kl_penalty_rewards
from alignflow.algorithms.pairwise_adv import (
    anchor_advantages,
    group_win_rate_advantages,
    normalized_win_rate_advantages,
)
from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig
from alignflow.rewards.pairwise import GREEDY_ANCHOR


def check_pairwise(cfg: RLConfig, advantage: str, sample_filter: str) -> None:
    """Load-time rules of the pairwise advantage; ConfigError names the keys."""
    pw = cfg.reward.pairwise
    if advantage != "pairwise":
        return
    if not (pw.model or pw.judge):
        raise ConfigError(
            "algo.advantage=pairwise needs a pairwise source: reward.pairwise.model (a preference model from "
            "alignflow pm) or reward.pairwise.judge=true (reward.judge with template pairwise)"
        )
    if sample_filter != "none":
        raise ConfigError(
            f"algo.sample_filter={sample_filter}: the pairwise advantage compares whole groups; use "
            "algo.sample_filter=none (or auto)"
        )
    if pw.anchor == "group" and cfg.rollout.n < 2:
        raise ConfigError(
            "reward.pairwise.anchor=group compares the samples of a prompt: rollout.n must be >= 2, "
            f"got {cfg.rollout.n}"
        )
    if pw.normalize and pw.anchor != "group":
        raise ConfigError(
            f"reward.pairwise.normalize scales the win rates of a group (Think-RM); anchor={pw.anchor} compares "
            "with one anchor: use anchor=group, or normalize=false (center=true for a group baseline)"
        )
    if pw.anchor == "greedy" and (cfg.env.task or cfg.env.path):
        raise ConfigError(
            "reward.pairwise.anchor=greedy decodes a greedy answer per prompt before scoring, which multi-turn "
            "episodes (env.task / env.path) do not do; use anchor=group or reference"
        )
    if cfg.reward.normalize != "none" or cfg.reward.clip > 0:
        raise ConfigError(
            "algo.advantage=pairwise reads preferences, not the (normalised) reward: set reward.normalize=none "
            "and reward.clip=0"
        )


def greedy_anchors(rollout, prompts: Batch, samples: Batch) -> Batch:
    """anchor=greedy: one greedy response per prompt row of ``prompts`` (the rollout role's ``generate(prompts,
    greedy=True)``), as meta ``pairwise_greedy`` of each of ``samples``' rows of that prompt (matched by meta
    ``group``, the prompt row's uid). Returns a meta-only Batch with the rows of ``samples``."""
    greedy = rollout.generate(prompts, greedy=True)
    by_group = {int(g): r for g, r in zip(greedy.meta["group"], greedy.meta["response"], strict=True)}
    return Batch(meta={GREEDY_ANCHOR: [by_group[int(g)] for g in samples.meta["group"]]})


def _groups(batch: Batch) -> list[list[int]]:
    out: dict = {}
    for i, g in enumerate(batch["group"]):
        out.setdefault(int(g), []).append(i)
    return list(out.values())


def pairwise_step(batch: Batch, ctx) -> dict:
    """``ADVANTAGE_STEPS["pairwise"]`` (module docstring): {"advantages": (B, T)}."""
    mask = batch["response_mask"]
    adv = torch.zeros(len(batch), dtype=torch.float64)
    if "pair_prefs" in batch:
        prefs, sizes = batch["pair_prefs"].double().cpu(), batch["pair_group_size"].cpu()
        for idx in _groups(batch):
            if any(int(sizes[i]) != len(idx) for i in idx):
                raise RuntimeError(
                    f"pairwise advantage: group {batch['group'][idx[0]]} has {len(idx)} rows but was scored "
                    f"with {int(sizes[idx[0]])}: a step that drops samples of a group cannot use it"
                )
            if len(idx) >= 2:
                estimate = normalized_win_rate_advantages if ctx.pairwise_normalize else group_win_rate_advantages
                adv[idx] = estimate(prefs[idx][:, : len(idx)])
    elif "anchor_prefs" in batch:
        p = batch["anchor_prefs"].double().cpu()
        for idx in _groups(batch):
            adv[idx] = anchor_advantages(p[idx], center=ctx.pairwise_center)
    else:
        raise ConfigError(
            "algo.advantage=pairwise: the batch has no pairwise preferences; set reward.pairwise.model or "
            "reward.pairwise.judge=true"
        )
    old = batch["old_logprobs"]
    ref = batch["ref_logprobs"] if ctx.beta > 0 else old
    kl_return = kl_penalty_rewards(
        torch.zeros_like(adv, dtype=old.dtype).to(old.device), old, ref, mask, ctx.beta, ctx.estimator
    ).sum(-1)
    seq = adv.to(device=mask.device, dtype=old.dtype) + kl_return  # (B,)
    return {"advantages": broadcast_to_tokens(seq, mask)}


def pairwise_metrics(batch: Batch) -> dict:
    """``pairwise/win_rate_mean`` (group: mean win rate, 1/2 for a symmetric scorer; anchor: mean P(y ≻ anchor)),
    ``pairwise/best_win_rate`` (group: the mean over groups of the best sample's win rate) and
    ``pairwise/symmetry_error`` (mean |p_ab + p_ba - 1| of the scorer's two orders)."""
    out = {}
    if "pair_symmetry_error" in batch:
        out["pairwise/symmetry_error"] = float(batch["pair_symmetry_error"].float().mean())
    if "anchor_prefs" in batch:
        out["pairwise/win_rate_mean"] = float(batch["anchor_prefs"].float().mean())
    if "pair_prefs" in batch and "group" in batch:
        prefs, best, rates = batch["pair_prefs"].double().cpu(), [], []
        for idx in _groups(batch):
            if len(idx) >= 2:
                w = group_win_rate_advantages(prefs[idx][:, : len(idx)]) + 0.5
                rates += w.tolist()
                best.append(float(w.max()))
        if rates:
            out["pairwise/win_rate_mean"] = sum(rates) / len(rates)
            out["pairwise/best_win_rate"] = sum(best) / len(best)
    return out
