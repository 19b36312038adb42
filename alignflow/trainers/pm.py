"""``alignflow pm``: train a pairwise preference model P(y ≻ y' | x) on preference pairs (docs/pairwise_rm.md).

Each pair (x, y_c, y_r) is scored in both orders in one forward, ``x ⊕ y_c ⊕ y_r`` and ``x ⊕ y_r ⊕ y_c``
(the logit ``z(x, a, b) = u_a - u_b`` of :mod:`alignflow.rewards.preference_model`), and trained with
:func:`alignflow.algorithms.pairwise.pairwise_preference_loss` (``pm.symmetric`` picks the measured or the
enforced reading of the logit). The backbone is loaded like a reward model's (a causal LM with a new one-output
head).

Metrics: ``pm/accuracy``, ``pm/win_prob``, ``pm/symmetry_gap``, ``pm/order_agreement`` per step (``train/``) and
on the held-out pairs (``eval/``), plus ``eval/accuracy_sym`` and ``eval/ece`` of the symmetric probability the
model is used with (:class:`alignflow.rewards.preference_model.PreferenceModel`), so they compare with the
Bradley-Terry reward model's ``eval/accuracy`` and ``eval/ece`` on the same pairs.

Run it:  ``alignflow pm --config configs/pm.yaml`` (no paths: the built-in ``reviews`` task's pairs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignflow.algorithms.pairwise import pairwise_preference_loss
from alignflow.algorithms.reward import calibration_error
from alignflow.config import PMConfig
from alignflow.data.collate import token_budget_groups
from alignflow.data.pipeline import prepare_data
from alignflow.distributed.checkpoint import save_checkpoint
from alignflow.distributed.save import save_model
from alignflow.models import load_reward_model
from alignflow.rewards.preference_model import pair_logits, pair_sequence, score_pairs, write_meta
from alignflow.trainers import loop
from alignflow.trainers.setup import resolve_builtin, start_run

log = logging.getLogger("alignflow.pm")
METRICS = ("pm/accuracy", "pm/win_prob", "pm/symmetry_gap", "pm/order_agreement")


@dataclass
class PMResult:
    model: object
    tokenizer: object
    losses: list[float] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    output_dir: Path = Path(".")


def both_orders(pair: dict, max_len: int) -> tuple[tuple, tuple]:
    """The items (sequence, index of the first response's last token) of x ⊕ y_c ⊕ y_r and x ⊕ y_r ⊕ y_c."""
    k = pair["prompt_len"]
    x, c, r = pair["chosen_ids"][:k], pair["chosen_ids"][k:], pair["rejected_ids"][k:]
    return pair_sequence(x, c, r, max_len), pair_sequence(x, r, c, max_len)


def pm_step(model, pairs: list[dict], cfg: PMConfig, pad_id: int, device, max_len: int) -> tuple[dict, int]:
    """Forward/backward of the loss over ``pairs`` (mean over pairs, whatever the micro-batch split)."""
    n, tokens = len(pairs), 0
    seqs = [both_orders(p, max_len) for p in pairs]
    sums = torch.zeros(1 + len(METRICS), device=device)
    for g in token_budget_groups([2 * len(a[0]) for a, _ in seqs], cfg.train.micro_batch_tokens):
        chunk = [seqs[i][0] for i in g] + [seqs[i][1] for i in g]
        with loop.autocast(device, cfg.train.mixed_precision):
            z = pair_logits(model, chunk, pad_id, device)  # (2b,)
        loss, m = pairwise_preference_loss(z[: len(g)], z[len(g) :], cfg.pm.symmetric)
        (loss * len(g) / n).backward()
        sums += torch.stack([loss.detach()] + [m[k] for k in METRICS]) * len(g)
        tokens += sum(len(s) for s, _ in chunk)
    values = (sums / n).tolist()
    if not torch.isfinite(torch.tensor(values[0])):
        return {"loss": float("nan")}, 0
    return {"loss": values[0], **dict(zip(METRICS, values[1:], strict=True))}, tokens


@torch.no_grad()
def evaluate_pm(
    model, pairs: list[dict], symmetric: bool, pad_id: int, device, max_len: int, budget: int = 8192
) -> dict:
    """Held-out metrics (see the module docstring); {} without pairs."""
    if not pairs:
        return {}
    seqs = [both_orders(p, max_len) for p in pairs]
    z = score_pairs(model, [a for a, _ in seqs] + [b for _, b in seqs], pad_id, device, budget)
    z_ab, z_ba = z[: len(pairs)], z[len(pairs) :]
    loss, m = pairwise_preference_loss(z_ab, z_ba, symmetric)
    if symmetric:
        logit = 0.5 * (z_ab - z_ba)
    else:  # the logit of ½ (σ(z_ab) + 1 - σ(z_ba)), the probability PreferenceModel returns
        p = (0.5 * (torch.sigmoid(z_ab) + 1.0 - torch.sigmoid(z_ba))).clamp(1e-6, 1 - 1e-6)
        logit = torch.log(p) - torch.log1p(-p)
    out = {f"eval/{k.split('/', 1)[1]}": float(v) for k, v in m.items()}
    return out | {
        "eval/loss": float(loss),
        "eval/accuracy_sym": float((logit > 0).float().mean()),
        "eval/ece": calibration_error(logit),
    }


def train_pm(cfg: PMConfig) -> PMResult:
    """Train the preference model and report held-out metrics; writes ``<output_dir>/model``."""
    resolve_builtin(cfg, "po")  # the built-in task's preference pairs when data.path is empty
    out, device, tokenizer = start_run(cfg)
    pad_id = tokenizer.pad_token_id
    data = prepare_data(cfg.data, tokenizer, expect=("preference",), seed=cfg.train.seed)
    model = load_reward_model(cfg.model, num_labels=1, device=device, seed=cfg.train.seed, pad_token_id=pad_id)
    max_len = int(getattr(model.config, "max_position_embeddings", 4096))
    model.train()
    run = loop.open_loop(model, len(data.train), cfg.optim, cfg.train, out, cfg.train.seed)
    bar = loop.Progress(run.total, run.start, cfg.train.progress, "pm")
    losses = []
    for step in range(run.start, run.total):
        t0 = time.perf_counter()
        rows = [data.train[i] for i in run.sampler.rows(step)]
        metrics, ntok = pm_step(model, rows, cfg, pad_id, device, max_len)
        if loop.guard_loss(step, cfg.train, {"pm": torch.tensor(metrics["loss"])}):
            metrics["grad_norm"], _ = loop.optimizer_step(
                model, run.opt, run.sched, cfg.train, cfg.optim.max_grad_norm, step
            )
        else:
            run.opt.zero_grad(set_to_none=True)
        metrics |= {"lr": run.sched.get_last_lr()[0], "perf/tokens_per_s": ntok / (time.perf_counter() - t0)}
        losses.append(metrics["loss"])
        bar.update(ntok, loss=metrics["loss"])
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == run.total:
            run.logger.log(
                step + 1, {f"train/{k}" if k in ("loss", "lr", "grad_norm") else k: v for k, v in metrics.items()}
            )
        loop.checkpoint_step(
            step + 1,
            run.total,
            cfg.train,
            out,
            lambda path, s=step: save_checkpoint(path, model, run.opt, run.sched, {"step": s + 1}),
        )
    bar.close()
    result = PMResult(model, tokenizer, losses, output_dir=out)
    result.eval = evaluate_pm(model, data.eval, cfg.pm.symmetric, pad_id, device, max_len, cfg.train.micro_batch_tokens)
    run.logger.log(run.total, result.eval)
    run.logger.close()
    save_model(model, tokenizer, out / "model")
    write_meta(out / "model", cfg.pm.symmetric)
    log.info("pm: held-out %s", {k: round(v, 4) for k, v in result.eval.items()})
    return result
