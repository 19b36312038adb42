"""``alignflow ift``: Intuitive Fine-Tuning on the SFT trainer's data, loop, checkpoints and evaluation.

Only the step differs from ``alignflow sft``: each micro-batch runs the two forwards of
:func:`alignflow.trainers.ift_step.ift_token_logps` and the loss of :func:`alignflow.algorithms.ift.ift_loss`. The
step's loss is the mean over its rows of each row's weighted token mean (each micro-batch adds its rows' sum divided
by the step's row count, so the split does not change it). Rows are right-padded: the mixed input embeddings cannot
go through the padding-free path. ``eval/loss`` is the ordinary held-out NLL, comparable with SFT's. docs/ift.md.
"""

from __future__ import annotations

import torch

from alignflow.algorithms.ift import ift_loss
from alignflow.config import IFTConfig
from alignflow.trainers import loop
from alignflow.trainers.ift_step import ift_token_logps
from alignflow.trainers.sft import SFTResult, micro_batches, train_sft


def ift_train_step(model, examples: list[dict], cfg: IFTConfig, pad_id: int, device) -> tuple[dict, int]:
    """One optimiser step's forwards/backwards (gradients left in ``.grad``); (metrics, tokens)."""
    total, nll = torch.zeros((), device=device), torch.zeros((), device=device)
    for mb in micro_batches(examples, False, cfg.data.max_len, cfg.train.micro_batch_tokens, pad_id):
        ids, att, mask = (mb[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
        with loop.autocast(device, cfg.train.mixed_precision):
            lp = ift_token_logps(model, ids, att, mask, cfg.ift.lam)  # (b, T)
        loss, metrics = ift_loss(lp.float(), mask, gamma=cfg.ift.gamma, reduction="sum")
        (loss / len(examples)).backward()
        total += loss.detach() / len(examples)
        nll += metrics["ift/nll"] * ids.shape[0] / len(examples)
    if not torch.isfinite(total):
        return {"loss": float("nan")}, 0
    return {"loss": total.item(), "ift/nll": nll.item()}, sum(len(e["input_ids"]) for e in examples)


@loop.bar_command("ift")
def train_ift(cfg: IFTConfig) -> SFTResult:
    """Run IFT as configured; returns the trained model and the per-step losses (as ``train_sft``)."""
    return train_sft(cfg, step_fn=ift_train_step)
