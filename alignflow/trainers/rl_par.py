"""Reward shaping against reference responses in the online-RL controller: PAR (Preference As Reward, Fu et al.
2025) and its relatives (``reward.shaping``; docs/par.md; the pure shapings are :mod:`alignflow.rewards.shaping`).

For each prompt the reference policy (``ref_model``, by default the initial policy) answers ``M`` times
(``reward.reference_samples`` sampled at ``rollout.temperature``, or one greedy answer with
``reward.reference_greedy``); the reward sources score those answers once and the scores are cached by prompt
text (the reference policy and a reward model are frozen, so the scores of a prompt never change). The training
reward of a sample ``y`` becomes ``shaping(R(x, y), r_ref(x))``, e.g. PAR ``(1/M) Σ_m σ(R(x, y) − r_ref_m)``.

Departures: the cache lives in memory, so a resumed run draws its sampled references again (the greedy ones are
the same); rule rewards (``reward.task``, ``reward.functions``) are shaped too, like a reward model's.
"""

from __future__ import annotations

import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig
from alignflow.rewards.shaping import apply_shaping


def check_shaping(cfg: RLConfig) -> None:
    """The placements reference shaping supports; ConfigError names the keys."""
    if cfg.reward.shaping == "none":
        return
    if cfg.resources.backend == "ray" or cfg.resources.actor.workers > 1:
        raise ConfigError(
            f"reward.shaping={cfg.reward.shaping} runs in one process for now: set "
            "resources.actor.workers to 0 or 1 (and resources.backend to auto or local)"
        )
    if cfg.model.lora.enabled and not cfg.ref_model:
        raise ConfigError(
            f"reward.shaping={cfg.reward.shaping} with model.lora.enabled needs ref_model (the "
            "reference policy that answers the prompts as a separate model)"
        )


class ReferenceScores:
    """Scores of the reference policy's responses, per prompt text: ``(M,)`` tensors."""

    def __init__(self, greedy: bool = False):
        self.greedy = greedy
        self.cache: dict[str, torch.Tensor] = {}
        self.generated = 0  # reference responses generated so far (a metric)

    def _fill(self, roles, batch: Batch, missing: list[int]) -> None:
        first = batch.select(missing)
        ids, mask = first["prompt_ids"], first["prompt_mask"]
        skip = {"response", "finish_reason", "prompt_index"}
        meta = {k: v for k, v in first.meta.items() if k not in skip}
        meta["prompt_token_ids"] = [i[m.bool()].tolist() for i, m in zip(ids, mask, strict=True)]
        out = roles.ref_rollout.generate(Batch(meta=meta), greedy=self.greedy)
        scores = roles.reward.score(out)["scores"].float().cpu()  # (P * M,)
        m = len(out) // len(missing)
        self.generated += len(out)
        for j, prompt in enumerate(first["prompt"]):
            self.cache[prompt] = scores[j * m : (j + 1) * m]  # (M,)

    def for_batch(self, roles, batch: Batch) -> torch.Tensor:
        """``r_ref`` (B, M) for the rows of ``batch``, generating and scoring the prompts not seen before."""
        seen: set = set()
        missing = []
        for i, p in enumerate(batch["prompt"]):
            if p not in self.cache and p not in seen:
                seen.add(p)
                missing.append(i)
        if missing:
            self._fill(roles, batch, missing)
        return torch.stack([self.cache[p] for p in batch["prompt"]])  # (B, M)


def shape_with_references(roles, batch: Batch, cfg: RLConfig, refs: ReferenceScores) -> dict:
    """Replace ``scores`` (and ReMax's ``greedy_scores``) in place by ``reward.shaping`` of them against the
    reference responses' scores; returns ``shaping/raw_reward_mean``, ``shaping/ref_reward_mean``,
    ``shaping/win_rate`` (fraction of (sample, reference) pairs the sample out-scores),
    ``shaping/shaped_reward_mean`` and ``shaping/reference_responses`` (generated so far)."""
    r_ref = refs.for_batch(roles, batch)  # (B, M)
    raw = batch["scores"].float()
    ref = r_ref.to(raw.device)
    m = {
        "shaping/raw_reward_mean": float(raw.mean()),
        "shaping/ref_reward_mean": float(ref.mean()),
        "shaping/win_rate": float((raw[:, None] > ref).float().mean()),
        "shaping/reference_responses": float(refs.generated),
    }
    for key in ("scores", "greedy_scores"):
        if key in batch:
            batch[key] = apply_shaping(cfg.reward.shaping, batch[key].float(), ref)
    return m | {"shaping/shaped_reward_mean": float(batch["scores"].mean())}
