"""Reward-model training: Bradley-Terry on pairs, multi-objective regression on rated data, ensembles.

* **Bradley-Terry** (``reward.loss=bt``): ``L = -log sigma(r(x, y_c) - r(x, y_r) - m)`` with the row's margin m
  when ``reward.use_margin`` (Llama 2). Chosen and rejected go through ONE forward (concatenated in the batch).
* **Multi-objective regression** (``reward.loss=regression`` on ``rated`` rows): a K-output head regressed onto
  the K attribute ratings (ArmoRM stage 1; we train the head and the backbone jointly, the paper freezes the
  backbone and fits ridge regression -- freeze it with LoRA or a small lr if you want the paper's setting).
  With ``reward.gating=true`` a second stage trains ArmoRM's gating network with BT on pairs derived from the
  ratings (best vs worst by mean rating), backbone and head frozen.
* **Ensembles** (Coste et al. 2024): ``reward.ensemble_size=k``. ``ensemble_mode=heads``: k independently seeded
  heads on one backbone, each with its own BT loss (the loss is the mean over heads);
  ``ensemble_mode=models``: k independent models trained from seeds ``seed..seed+k-1``. Scores combine with
  ``reward.aggregation`` = mean | min (worst case) | uwo (mean - lambda * variance).

Metrics: ``reward/accuracy`` (r_c > r_r), ``reward/margin`` (mean r_c - r_r), ``reward/ece`` (calibration of
sigma(r_c - r_r)), on held-out pairs as ``eval/...``.

Run it:  ``alignflow rm --config configs/rm.yaml`` (no paths: the built-in ``reviews`` task's pairs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignflow.algorithms.reward import aggregate, bt_loss, calibration_error, regression_loss
from alignflow.config import RMConfig
from alignflow.data.collate import pad_right, token_budget_groups, token_groups
from alignflow.data.pipeline import check_objectives, prepare_data
from alignflow.distributed.checkpoint import save_checkpoint
from alignflow.distributed.save import save_model
from alignflow.models import GatingNetwork, load_reward_model
from alignflow.models.heads import last_token_hidden
from alignflow.models.sequences import forward_scores, score
from alignflow.models.varlen import supports_varlen
from alignflow.trainers import loop
from alignflow.trainers.setup import resolve_builtin, start_run

log = logging.getLogger("alignflow.rm")


@dataclass
class RMResult:
    models: list
    tokenizer: object
    losses: list[float] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    output_dir: Path = Path(".")
    tokens_per_s: float = 0.0
    gate: object = None


def pair_groups(pairs: list[dict], budget: int, flat: bool = False) -> list[list[int]]:
    """Micro-batches of pairs; chosen and rejected of a group share one forward of 2n sequences.

    ``flat`` (padding-free rows): consecutive pairs up to ``budget`` real tokens. Otherwise length-sorted
    groups under ``budget`` padded tokens (each pair costs twice its longer sequence).
    """
    if flat:
        return token_groups([len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs], budget)
    lengths = [2 * max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
    return token_budget_groups(lengths, budget)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, prefix: str) -> dict:
    """Accuracy, margin and ECE of (N,) score differences."""
    diff = chosen - rejected
    return {
        f"{prefix}/accuracy": (diff > 0).float().mean().item(),
        f"{prefix}/margin": diff.mean().item(),
        f"{prefix}/ece": calibration_error(diff),
    }


def evaluate_pairs(chosen: torch.Tensor, rejected: torch.Tensor, cfg: RMConfig) -> dict:
    """Held-out pairwise metrics of (N, k) member scores: the configured aggregation, plus each one when k > 1."""
    if chosen.numel() == 0:
        return {}
    r = cfg.reward
    out = pair_metrics(
        aggregate(chosen, r.aggregation, r.uwo_lambda), aggregate(rejected, r.aggregation, r.uwo_lambda), "eval"
    )
    if chosen.shape[1] > 1:
        for mode in ("mean", "min", "uwo"):
            diff = aggregate(chosen, mode, r.uwo_lambda) - aggregate(rejected, mode, r.uwo_lambda)
            out[f"eval/accuracy_{mode}"] = (diff > 0).float().mean().item()
        for i in range(chosen.shape[1]):
            out[f"eval/accuracy_member{i}"] = (chosen[:, i] > rejected[:, i]).float().mean().item()
    return out


def member_scores(models: list, seqs: list[list[int]], pad_id: int, device, per_model: int) -> torch.Tensor:
    """(N, k) scores: every model's outputs side by side, each model's K attributes averaged when K > 1."""
    cols = []
    for m in models:
        s = score(m, seqs, pad_id, device)  # (N, per_model * K)
        cols.append(s.view(s.shape[0], per_model, -1).mean(-1))  # (N, per_model)
    return torch.cat(cols, -1)


# ------------------------------------------------------------------------------------------ steps
def bt_step(model, pairs: list[dict], cfg: RMConfig, pad_id: int, device) -> tuple[dict, int]:
    """One optimiser step's forward/backward of BT over ``pairs``; the loss is the mean over pairs (and heads).

    With ``train.packing`` each micro-batch is one padding-free row of its pairs' 2n sequences. Metrics are
    summed as tensors and read once per step (no host sync per micro-batch).
    """
    n, tokens = len(pairs), 0
    flat = cfg.train.packing and supports_varlen(model)
    sums = torch.zeros(3, device=device)  # loss, accuracy * n, margin * n
    for g in pair_groups(pairs, cfg.train.micro_batch_tokens, flat):
        chunk = [pairs[i] for i in g]
        seqs = [p["chosen_ids"] for p in chunk] + [p["rejected_ids"] for p in chunk]
        with loop.autocast(device, cfg.train.mixed_precision):
            s = forward_scores(model, seqs, pad_id, device, flat=flat).float()  # (2b, k)
        c, r = s[: len(chunk)], s[len(chunk) :]  # (b, k) each
        m = torch.tensor([p.get("margin", 0.0) if cfg.reward.use_margin else 0.0 for p in chunk], device=device)
        per, _ = bt_loss(c, r, m, reduction="none")  # (b,)
        loss = per.sum() / n  # mean over the step's pairs, whatever the split
        loss.backward()
        diff = (c - r).detach()  # (b, k)
        sums += torch.stack([loss.detach(), (diff > 0).float().mean(-1).sum(), diff.mean(-1).sum()])
        tokens += sum(len(x) for x in seqs)
    loss, acc, margin = (sums / torch.tensor([1.0, n, n], device=device)).tolist()
    if not torch.isfinite(torch.tensor(loss)):
        return {"loss": float("nan")}, 0
    return {"loss": loss, "reward/accuracy": acc, "reward/margin": margin}, tokens


def regression_step(model, rows: list[dict], cfg: RMConfig, pad_id: int, device) -> tuple[dict, int]:
    """MSE of the K-output head onto the ratings; normalised by the step's number of rated entries."""
    n_entries = sum(len(r["target"]) for r in rows)
    total, tokens = 0.0, 0
    for g in token_budget_groups([len(r["input_ids"]) for r in rows], cfg.train.micro_batch_tokens):
        chunk = [rows[i] for i in g]
        with loop.autocast(device, cfg.train.mixed_precision):
            pred = forward_scores(model, [r["input_ids"] for r in chunk], pad_id, device).float()  # (b, K)
        target = torch.tensor([r["target"] for r in chunk], device=device)  # (b, K)
        per, _ = regression_loss(pred, target, reduction="none")  # (b,) sums over K
        loss = per.sum() / n_entries
        loss.backward()
        total += loss.item()
        tokens += sum(len(r["input_ids"]) for r in chunk)
    return {"loss": total}, tokens


STEPS = {"bt": bt_step, "regression": regression_step}


# ------------------------------------------------------------------------------------------ rated data
def rated_rows(rows: list[dict], copies: int) -> list[dict]:
    """Encoded ``rated`` rows -> one regression example per completion (targets tiled for k heads)."""
    out = []
    for r in rows:
        for ids, ratings in zip(r["completions_ids"], r["ratings"], strict=False):
            out.append({"input_ids": list(ids), "target": list(ratings) * copies})
    return out


def rated_pairs(rows: list[dict]) -> list[dict]:
    """Best vs worst completion of each rated row by mean rating (the documented rated -> pairs rule)."""
    pairs = []
    for r in rows:
        means = [sum(x) / len(x) for x in r["ratings"]]
        best, worst = max(range(len(means)), key=means.__getitem__), min(range(len(means)), key=means.__getitem__)
        if means[best] > means[worst]:
            prompt_len = list(r["completions_mask"][best]).index(1)
            pairs.append(
                {
                    "chosen_ids": list(r["completions_ids"][best]),
                    "rejected_ids": list(r["completions_ids"][worst]),
                    "margin": means[best] - means[worst],
                    "prompt_ids": list(r["completions_ids"][best][:prompt_len]),
                }
            )
    return pairs


# ------------------------------------------------------------------------------------------ loops
def train_one(
    cfg: RMConfig, rows: list[dict], seed: int, num_labels: int, out: Path, pad_id: int, device, tokenizer
) -> tuple[torch.nn.Module, list[float], float]:
    """Train one reward model (one ensemble member, or the k-head model) on ``rows``."""
    loop.set_seed(seed)
    model = load_reward_model(cfg.model, num_labels=num_labels, device=device, seed=seed, pad_token_id=pad_id)
    model.train()
    run = loop.open_loop(model, len(rows), cfg.optim, cfg.train, out, seed)
    sampler, total, opt, sched, start, logger = run.sampler, run.total, run.opt, run.sched, run.start, run.logger
    bar = loop.Progress(
        total,
        start,
        cfg.train.progress,
        loop.bar_label("rm", cfg.reward.loss, out.name if out.name.startswith("member-") else ""),
    )
    step_fn, losses, rate = STEPS[cfg.reward.loss], [], 0.0
    for step in range(start, total):
        t0 = time.perf_counter()
        metrics, ntok = step_fn(model, [rows[i] for i in sampler.rows(step)], cfg, pad_id, device)
        if loop.guard_loss(step, cfg.train, {cfg.reward.loss: torch.tensor(metrics["loss"])}):
            metrics["grad_norm"], _ = loop.optimizer_step(model, opt, sched, cfg.train, cfg.optim.max_grad_norm, step)
        else:
            opt.zero_grad(set_to_none=True)
        metrics |= {"lr": sched.get_last_lr()[0], "perf/tokens_per_s": ntok / (time.perf_counter() - t0)}
        losses.append(metrics["loss"])
        rate = bar.update(ntok, loss=metrics["loss"])
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total:
            logger.log(step + 1, {f"train/{k}" if "/" not in k else k: v for k, v in metrics.items()})
        loop.checkpoint_step(
            step + 1,
            total,
            cfg.train,
            out,
            lambda path, done=step + 1: save_checkpoint(path, model, opt, sched, {"step": done}),
        )
    bar.close()
    logger.close()
    save_model(model, tokenizer, out / "model")
    return model, losses, rate


@torch.no_grad()
def prompt_embeddings(model, pairs: list[dict], pad_id: int, device) -> torch.Tensor:
    """Last-token hidden state of each pair's prompt (the gate's input): (N, H)."""
    prompts = [p["prompt_ids"] for p in pairs]
    ids = pad_right(prompts, pad_id).to(device)  # (N, T)
    return last_token_hidden(model, ids, pad_right([[1] * len(x) for x in prompts], 0).to(device)).float().cpu()


def train_gate(model, pairs: list[dict], cfg: RMConfig, pad_id: int, device, steps: int = 200) -> GatingNetwork:
    """ArmoRM stage 2: a prompt-conditioned gate over the K frozen attribute scores, trained with BT."""
    with torch.no_grad():
        c = score(model, [p["chosen_ids"] for p in pairs], pad_id, device)  # (N, K)
        r = score(model, [p["rejected_ids"] for p in pairs], pad_id, device)  # (N, K)
        emb = prompt_embeddings(model, pairs, pad_id, device)  # (N, H)
    gate = GatingNetwork(emb.shape[1], c.shape[1])
    opt = torch.optim.AdamW(gate.parameters(), lr=1e-3)
    for _ in range(steps):
        w = gate(emb)  # (N, K)
        loss, _ = bt_loss((w * c).sum(-1), (w * r).sum(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    gate.eval()
    return gate


@torch.no_grad()
def evaluate_gated(model, gate, pairs: list[dict], pad_id: int, device) -> dict:
    """Pairwise metrics of the gated score R = g(x)^T r(x, y)."""
    if not pairs:
        return {}
    emb = prompt_embeddings(model, pairs, pad_id, device)  # (N, H)
    w = gate(emb)  # (N, K)
    c = (w * score(model, [p["chosen_ids"] for p in pairs], pad_id, device)).sum(-1)
    r = (w * score(model, [p["rejected_ids"] for p in pairs], pad_id, device)).sum(-1)
    return pair_metrics(c, r, "eval")


def train_rm(cfg: RMConfig) -> RMResult:
    """Train the reward model(s) as configured and report held-out pairwise metrics."""
    resolve_builtin(cfg, "rm")
    out, device, tokenizer = start_run(cfg, seed=False)
    pad_id = tokenizer.pad_token_id
    data = prepare_data(cfg.data, tokenizer, expect=("preference", "rated"), seed=cfg.train.seed)
    check_objectives(data, cfg.reward.num_objectives, cfg.reward.loss, cfg.data.path)
    r, k = cfg.reward, cfg.reward.ensemble_size
    if data.format == "rated":
        n_obj = len(data.train[0]["attributes"])
        rows = (
            rated_rows(data.train, 1 if r.ensemble_mode == "models" else k)
            if r.loss == "regression"
            else rated_pairs(data.train)
        )
        eval_pairs = rated_pairs(data.eval)
    else:
        if r.loss == "regression":
            raise ValueError(
                "reward.loss=regression needs 'rated' rows (prompt, completions, ratings); "
                f"{cfg.data.path} holds '{data.format}' rows -- use reward.loss=bt"
            )
        n_obj, rows, eval_pairs = 1, data.train, data.eval
    if r.loss == "bt" and n_obj > 1:
        n_obj = 1  # BT trains one score per member on the derived pairs
    members = k if r.ensemble_mode == "models" else 1
    labels = n_obj * (1 if r.ensemble_mode == "models" else k)
    models, losses, rate = [], [], 0.0
    for i in range(members):
        sub = out / f"member-{i}" if members > 1 else out
        m, losses_i, rate = train_one(cfg, rows, cfg.train.seed + i, labels, sub, pad_id, device, tokenizer)
        models.append(m)
        losses = losses or losses_i
    result = RMResult(models, tokenizer, losses, output_dir=out, tokens_per_s=rate)
    per_model = 1 if r.ensemble_mode == "models" else k
    if r.loss == "regression" and r.gating:
        result.gate = train_gate(models[0], rated_pairs(data.train), cfg, pad_id, device)
        result.gate.save(out / "model")
        result.eval = evaluate_gated(models[0], result.gate, eval_pairs, pad_id, device)
    elif eval_pairs:
        c = member_scores(models, [p["chosen_ids"] for p in eval_pairs], pad_id, device, per_model)
        rj = member_scores(models, [p["rejected_ids"] for p in eval_pairs], pad_id, device, per_model)
        result.eval = evaluate_pairs(c, rj, cfg)
    logger = loop.MetricsLogger(out, resume=True)
    logger.log(loop.StepSampler(len(rows), cfg.train.batch_size, cfg.train.seed).total_steps(cfg.train), result.eval)
    logger.close()
    return result
