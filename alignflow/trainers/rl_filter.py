"""The PF-PPO step of the online-RL controller: filter a scored rollout batch (``algo.sample_filter``) and log
the reward's reliability per reward bucket (docs/pf_ppo.md; the pure functions are
:mod:`alignflow.algorithms.filtration`)."""

from __future__ import annotations

import math

import torch

from alignflow.algorithms.filtration import bucket_accuracy, select_rows
from alignflow.batch import Batch

NUM_BUCKETS = 4


def reliability_metrics(batch: Batch, gold) -> dict:
    """``pf/rm_acc_bucket<k>`` (k = 0 lowest proxy-reward quarter .. 3 highest) and ``pf/rm_pairs_bucket<k>``:
    how often the training reward orders a sample against the other samples of its prompt like the task's gold
    reward does. Needs a gold reward (built-in tasks) and groups of n >= 2; {} otherwise."""
    if gold is None or len(set(batch["group"])) == len(batch):
        return {}
    g = torch.tensor(gold(batch["prompt"], batch["response"]), dtype=torch.double)  # (B,)
    out = {}
    for k, (acc, pairs) in enumerate(bucket_accuracy(batch["scores"], g, torch.as_tensor(batch["group"]), NUM_BUCKETS)):
        out[f"pf/rm_pairs_bucket{k}"] = float(pairs)
        if not math.isnan(acc):
            out[f"pf/rm_acc_bucket{k}"] = acc
    return out


def filter_rollouts(batch: Batch, mode: str, low_high: list, seed: int, step: int, gold=None) -> tuple[Batch, dict]:
    """The kept rows of ``batch`` under ``mode`` and the metrics ``pf/kept_frac``, ``pf/kept_reward_mean``,
    ``pf/dropped_reward_mean`` and the reliability buckets (:func:`reliability_metrics`, all rows before the
    filter). ``mode`` none returns the batch unchanged with no metrics."""
    if mode == "none":
        return batch, {}
    m = reliability_metrics(batch, gold)
    gen = torch.Generator().manual_seed(seed * 1_000_033 + step)  # best_random's draw: reproducible and resumable
    keep = select_rows(
        mode, batch["scores"].cpu(), torch.as_tensor(batch["group"]), float(low_high[0]), float(low_high[1]), gen
    )
    dropped = sorted(set(range(len(batch))) - set(keep.tolist()))
    scores = batch["scores"].float()
    m["pf/kept_frac"] = len(keep) / max(len(batch), 1)
    m["pf/kept_reward_mean"] = float(scores[keep.to(scores.device)].mean())
    if dropped:
        m["pf/dropped_reward_mean"] = float(scores[torch.tensor(dropped, device=scores.device)].mean())
    return batch.select(keep.tolist()), m
