"""The pre-training (PTX) term of the actor update (InstructGPT's PPO-ptx; PPO-max, docs/ppo_max.md).

Every actor optimiser step adds ``ptx_coef · L_ptx`` to the policy loss, where

    L_ptx = − Σ_{rows, t in mask} log π_θ(x_t | x_<t) / (number of masked tokens)

is the token-mean negative log-likelihood of ``algo.ptx_batch_size`` rows of SFT data (the response tokens of
prompt+completion rows, every token but the first of text rows), drawn in seeded epoch permutations. The rows
come from ``algo.ptx_path``, or, when it is empty, from the built-in task's SFT corpus. The term keeps the policy
close to the data distribution it was fine-tuned on (InstructGPT: it curbs the "alignment tax" on public NLP
benchmarks). It is computed in the actor's process, on its own forward pass, after the policy micro-batches and
before the one optimiser step, so it does not change the policy loss's normalisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignflow.config import ConfigError, DataConfig, RLConfig
from alignflow.data.collate import pad_batch
from alignflow.data.pipeline import prepare_data
from alignflow.models.logprobs import masked_nll_sum
from alignflow.tasks import build_task


class PTXStream:
    """SFT examples (``input_ids``, ``loss_mask``) in seeded epoch permutations laid end to end. ``at(start, k)``
    returns stream rows start .. start + k − 1 right-padded (``input_ids``, ``attention_mask``, ``loss_mask``,
    each (k, T)); the actor asks for rows ``steps · k`` onwards (its optimiser steps so far), so a resumed run
    reads the same rows as an uninterrupted one."""

    def __init__(self, examples: list[dict], seed: int, pad_id: int):
        if not examples:
            raise ConfigError("algo.ptx_path: no SFT rows to compute the PTX loss on")
        self.examples, self.seed, self.pad_id = examples, seed, pad_id
        self._perm: tuple[int, list[int]] = (-1, [])

    def _row(self, pos: int) -> dict:
        epoch, i = divmod(pos, len(self.examples))
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
            self._perm = (epoch, torch.randperm(len(self.examples), generator=g).tolist())
        return self.examples[self._perm[1][i]]

    def at(self, start: int, k: int) -> dict:
        return pad_batch([self._row(start + j) for j in range(k)], self.pad_id)


def ptx_examples(rows: list[dict]) -> list[dict]:
    """Tokenised SFT rows -> examples whose first token is out of the loss (nothing predicts it)."""
    out = []
    for r in rows:
        mask = list(r["loss_mask"])
        mask[0] = 0
        if any(mask):
            out.append({"input_ids": list(r["input_ids"]), "loss_mask": mask})
    return out


def ptx_loss(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    """(token-mean NLL of the batch's loss tokens, their count); a right-padded batch runs without its mask
    (causal attention never lets a real token see the padding after it)."""
    mask = batch["loss_mask"].to(device)
    count = int(batch["loss_mask"].sum())
    nll = masked_nll_sum(model, batch["input_ids"].to(device), mask)
    return nll / max(count, 1), count


def build_ptx(cfg: RLConfig, tok) -> PTXStream | None:
    """The PTX stream of a run (None when ``algo.ptx_coef`` is 0): ``algo.ptx_path`` or the task's SFT corpus."""
    if cfg.algo.ptx_coef <= 0:
        return None

    path = cfg.algo.ptx_path
    if not path:
        path = str(build_task(cfg.task.name, cfg.task, Path(cfg.train.output_dir) / "task").sft_path)
    data_cfg = DataConfig(
        path=path, format="auto", eval_fraction=0.0, max_len=cfg.data.max_len, chat_template=cfg.data.chat_template
    )
    data = prepare_data(data_cfg, tok, expect=("lm", "prompt_completion"), seed=cfg.train.seed)
    return PTXStream(ptx_examples(data.train), cfg.train.seed, tok.pad_token_id or 0)
