"""``alignflow alol``: advantage-weighted offline RL (docs/alol.md); the pieces it shares with SuperHF are in
:mod:`alignflow.trainers.offline_common`.

**A-LoL** (Baheti et al. 2023, "Leftover Lunch: advantage-based offline RL"; ``alignflow alol``)::

    rows    = fixed (x, y) data; R(x, y) from the row's reward field or scored once by the reward sources
    V_ref   = MLP on π_ref's last prompt hidden state, MSE-fit to R of rollout.n samples per prompt from π_ref
    A       = R − V_ref(x);  drop rows with A <= 0                          (counts reported)
    LP_ref  = π_ref's per-token log-probs of every kept row, computed once
    for each step: rows uniformly (epochs) or ∝ A (good_priority); minimise mean[A·w·NLL_sum(y)],
              w = sg[clip(π_θ(y|x)/π_ref(y|x), 1 − c, 1 + c)], c = 0.9 (variants seq / ref_free / kl)

Departures, on purpose:
* A-LoL's π_ref is the policy's initial weights, and everything π_ref is needed for (its samples, prompt features,
  log-probs) is computed before the first update, so no second model is held during training; the results are
  saved in ``precomputed.safetensors`` and reused on resume.
* The value MLP is fit on the *training* prompts' reference samples (rollout.n per prompt; the reference code uses
  the dev set's greedy responses), full-batch Adam on standardised targets (reference: AdamW lr 1e-5, 10 epochs,
  best epoch kept). One prompt in ten is held out to report ``value/val_explained_var`` when there are >= 20.

Run:  ``alignflow alol --config configs/alol.yaml`` (``docs/alol.md``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignflow.algorithms.offline import (
    alol_advantages,
    alol_keep_mask,
    alol_loss,
    alol_sampling_weights,
)
from alignflow.batch import Batch
from alignflow.config import ALoLConfig, ConfigError
from alignflow.data.formats import DataError, enforce_bad_row_policy, validate
from alignflow.data.loading import load_records
from alignflow.data.render import encode_pair, encode_prompt
from alignflow.distributed.save import save_model
from alignflow.models import hidden_states, load_causal_lm
from alignflow.trainers import loop
from alignflow.trainers.offline_common import (
    OfflineRLResult,
    _eval_batch,
    _reward,
    reference_mode,
)
from alignflow.trainers.rl import evaluate
from alignflow.trainers.rl_setup import Roles, prompt_batch
from alignflow.trainers.roles import (
    Optimised,
    Rollout,
    micro_batches,
    response_logprobs,
    scatter_rows,
)
from alignflow.trainers.setup import resolve_builtin, start_run, task_gold

log = logging.getLogger("alignflow.alol")


# ----------------------------------------------------------------------------------------------- A-LoL: data
def read_offline_rows(path: str, cfg: ALoLConfig, tok) -> tuple[list[dict], list[str]]:
    """Fixed data -> rows ``{prompt, response, fields, prompt_ids, response_ids, reward (float or None)}``.

    prompt_completion rows give one row each (``reward`` from ``alol.reward_field`` when present); preference rows
    give two (chosen and rejected), to be scored by the reward sources. Bad rows follow ``data.on_bad_row``.
    """
    d, field_name = cfg.data, cfg.alol.reward_field
    checked = validate(load_records(path, d.split), fmt=d.format, on_bad_row=d.on_bad_row, source=path)
    if checked.format not in ("prompt_completion", "preference"):
        raise DataError(
            f"{path}: rows are in '{checked.format}' format; A-LoL needs prompt_completion rows "
            "(prompt, completion, optional reward) or preference rows (set data.format to force one)"
        )
    texts = ("completion",) if checked.format == "prompt_completion" else ("chosen", "rejected")
    rows, problems, n_bad, n_cut = [], [], 0, 0
    for row, where in zip(checked.rows, checked.where, strict=False):
        reward = row.get(field_name) if checked.format == "prompt_completion" else None
        try:
            if reward is not None and (
                isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward)
            ):
                raise DataError(f"field '{field_name}': expected a finite number, got {reward!r:.60}")
            encoded = [encode_pair(tok, row["prompt"], row[t], d.max_prompt_len, d.max_len) for t in texts]
        except DataError as e:
            n_bad += 1
            problems.append(f"{where}: {e}")
            continue
        fields = {k: v for k, v in row.items() if k not in texts + ("prompt", field_name)}
        n_cut += any(enc.truncated for enc in encoded)
        for enc in encoded:
            ids = enc.input_ids
            rows.append(
                {
                    "prompt": row["prompt"],
                    "fields": fields,
                    "prompt_ids": ids[: enc.prompt_len],
                    "response_ids": ids[enc.prompt_len :],
                    "reward": None if reward is None else float(reward),
                }
            )
    enforce_bad_row_policy(problems, n_bad, len(checked.rows), d.on_bad_row, path)
    reports = [checked.summary()] if checked.skipped else []
    if n_bad or n_cut:  # skipped rows are always reported; so are truncated ones (max_len cuts data)
        reports.append(
            f"{path}: {n_bad} rows skipped at tokenisation, {n_cut} rows truncated (data.max_len, "
            "data.max_prompt_len)" + "".join(f"\n  {p}" for p in problems[:5])
        )
    for r in reports:
        log.warning(r)
    return rows, reports


def rows_batch(rows: list[dict], tok) -> Batch:
    """Rows -> a Batch laid out like the rollout engine's: left-padded prompt then right-padded response
    (``input_ids``/``attention_mask``/``position_ids`` (B, Tp + Tr), ``prompt_*`` (B, Tp), ``response_*`` (B, Tr)),
    meta ``prompt``, ``response`` (decoded like a rollout's) and every other field of the rows."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    Tp, Tr = max(len(r["prompt_ids"]) for r in rows), max(len(r["response_ids"]) for r in rows)
    B = len(rows)
    prompt, prompt_mask = torch.full((B, Tp), pad), torch.zeros(B, Tp, dtype=torch.long)
    response, response_mask = torch.full((B, Tr), pad), torch.zeros(B, Tr, dtype=torch.long)
    for i, r in enumerate(rows):
        p, y = r["prompt_ids"], r["response_ids"]
        prompt[i, Tp - len(p) :], prompt_mask[i, Tp - len(p) :] = torch.tensor(p), 1  # left padding
        response[i, : len(y)], response_mask[i, : len(y)] = torch.tensor(y), 1  # right padding
    attention_mask = torch.cat([prompt_mask, response_mask], 1)  # (B, Tp + Tr)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    meta = {
        "prompt": [r["prompt"] for r in rows],
        "response": tok.batch_decode([r["response_ids"] for r in rows], skip_special_tokens=True),
    }
    for key in sorted({k for r in rows for k in r["fields"]}):
        meta[key] = [r["fields"].get(key) for r in rows]
    return Batch(
        {
            "prompt_ids": prompt,
            "prompt_mask": prompt_mask,
            "response_ids": response,
            "response_mask": response_mask,
            "input_ids": torch.cat([prompt, response], 1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        },
        meta,
    )


def read_eval_prompts(path: str, cfg: ALoLConfig, tok) -> list[dict]:
    """Held-out prompts for the greedy evaluation from any file whose rows have a ``prompt`` (the fields other than
    the response texts are kept for the rewards)."""
    checked = validate(load_records(path, cfg.data.split), on_bad_row=cfg.data.on_bad_row, source=path)
    drop = {"completion", "chosen", "rejected", "responses", "completions", "ratings", "label"}
    return [
        {
            **{k: v for k, v in r.items() if k not in drop},
            "prompt_ids": encode_prompt(tok, r["prompt"], cfg.data.max_prompt_len),
        }
        for r in checked.rows
        if r.get("prompt") is not None
    ]


# ----------------------------------------------------------------------------------------------- A-LoL: π_ref passes
@torch.no_grad()
def reference_logprobs(model, batch: Batch, shared: bool, cfg) -> torch.Tensor:
    """π_ref's log-probs of every response token, (B, Tr), zero on padding."""
    parts = []
    with reference_mode(model, shared), loop.autocast(batch["input_ids"].device, cfg.train.mixed_precision):
        for idx, mb, pw in micro_batches(batch, cfg.train.micro_batch_tokens):
            parts.append((idx, response_logprobs(model, mb, pw, 1.0, False)[0] * mb["response_mask"]))
    return scatter_rows(parts, len(batch), batch["response_mask"].shape[1])


@torch.no_grad()
def prompt_features(model, prompts: list[list[int]], shared: bool, cfg, device) -> torch.Tensor:
    """π_ref's final hidden state at the last prompt token, (P, H) float32 (prompts left-padded in chunks)."""
    out = []
    width = max(len(p) for p in prompts)
    per = max(1, cfg.train.micro_batch_tokens // width)
    with reference_mode(model, shared):
        for s in range(0, len(prompts), per):
            chunk = prompts[s : s + per]
            ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)  # pad id 0: masked out
            mask = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
            for i, p in enumerate(chunk):
                ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p, device=device), 1
            out.append(hidden_states(model, ids, mask)[:, -1].float())  # (c, H): left padding -> last column
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- A-LoL: value fit
def fit_value(features: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, vcfg, seed: int):
    """Fit V(x) = MLP(features[x]) to (prompt index, reward) pairs by MSE; returns (V for every prompt (P,), metrics).

    features (P, H); index, targets (M,). Targets are standardised for the fit (the output layer starts at zero, so
    V starts at the mean reward). With P >= 20, prompts p % 10 == 9 are held out for ``value/val_*``.
    """
    mu, sd = targets.mean(), targets.std(unbiased=False).clamp_min(1e-6)
    y = (targets - mu) / sd  # (M,)
    held = (index % 10 == 9) if features.shape[0] >= 20 else torch.zeros_like(index, dtype=torch.bool)  # (M,)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(features.shape[1], vcfg.hidden_size), nn.Tanh(), nn.Linear(vcfg.hidden_size, 1))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    mlp.to(features.device)
    opt = torch.optim.Adam(mlp.parameters(), lr=vcfg.lr)
    x = features.detach().float()
    for _ in range(vcfg.steps):
        pred = mlp(x).squeeze(-1)[index]  # (M,)
        loss = ((pred - y)[~held] ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        values = mlp(x).squeeze(-1) * sd + mu  # (P,) in reward units
    err = (values[index] - targets) ** 2  # (M,)
    m = {
        "value/samples": float(len(targets)),
        "value/ref_reward_mean": float(mu),
        "value/target_var": float(targets[~held].var(unbiased=False)),
        "value/mse": float(err[~held].mean()),
    }
    m["value/explained_var"] = 1.0 - m["value/mse"] / max(m["value/target_var"], 1e-12)
    if bool(held.any()):
        m["value/val_mse"] = float(err[held].mean())
        m["value/val_explained_var"] = 1.0 - m["value/val_mse"] / max(float(targets[held].var(unbiased=False)), 1e-12)
    return values.detach(), m


def reference_values(policy, shared: bool, rows: list[dict], cfg: ALoLConfig, tok, reward, device):
    """V_ref(x) for every row: sample ``rollout.n`` responses per distinct prompt from π_ref, score them, fit the MLP
    on π_ref's prompt features. Returns (values (N,), metrics)."""
    keys = {}
    for r in rows:
        keys.setdefault(tuple(r["prompt_ids"]), r)
    firsts = list(keys.values())
    fit_rows = firsts[: cfg.value.num_prompts] if cfg.value.num_prompts else firsts
    prompts = [{"prompt": r["prompt"], "prompt_ids": r["prompt_ids"], **r["fields"]} for r in fit_rows]
    fields = sorted({k for p in prompts for k in p} - {"prompt_ids"})
    rollout = Rollout(policy, tok, cfg.rollout, device, cfg.train.mixed_precision, cfg.train.seed)
    n, per = cfg.rollout.n, cfg.rollout.prompts_per_step
    scores = []
    with contextlib.ExitStack() as stack:
        if shared:
            stack.enter_context(policy.disable_adapter())
        for s in range(0, len(prompts), per):
            batch = rollout.generate(
                prompt_batch(prompts[s : s + per], list(range(s, s + min(per, len(prompts) - s))), fields)
            )
            scores.append(reward.score(batch)["scores"].float())  # (p*n,)
    targets = torch.cat(scores)  # (F*n,): rows i*n .. i*n+n-1 are prompt i's
    index = torch.arange(len(prompts), device=targets.device).repeat_interleave(n)  # (F*n,)
    order = {key: i for i, key in enumerate(keys)}
    feats = prompt_features(policy, list(list(k) for k in keys), shared, cfg, device)  # (P, H), every prompt
    values, m = fit_value(feats, index.to(feats.device), targets.to(feats.device), cfg.value, cfg.train.seed)
    row_prompt = torch.tensor([order[tuple(r["prompt_ids"])] for r in rows], device=values.device)  # (N,)
    return values[row_prompt].cpu(), m


# ----------------------------------------------------------------------------------------------- A-LoL: precompute
def precompute(policy, shared: bool, rows: list[dict], cfg: ALoLConfig, tok, reward, device) -> tuple[dict, dict]:
    """Everything π_ref gives, once: rewards R (N,), values V (N,), advantages A (N,), ref log-probs (N, Tr)."""
    if reward is None:
        raise ConfigError(
            "A-LoL's value estimate scores samples of the reference policy (and rows without a "
            f"'{cfg.alol.reward_field}' field): set reward.task (e.g. {{gold: 1.0}}), reward.functions "
            "or reward.models"
        )
    batch = rows_batch(rows, tok).to(device)
    given = [r["reward"] is not None for r in rows]
    scored = reward.score(batch)["scores"].float().cpu() if not all(given) else None  # (N,)
    rewards = torch.tensor(
        [r["reward"] if r["reward"] is not None else float(scored[i]) for i, r in enumerate(rows)]
    )  # (N,)
    values, stats = reference_values(policy, shared, rows, cfg, tok, reward, device)
    pre = {"rewards": rewards, "values": values, "advantages": alol_advantages(rewards, values)}
    if cfg.alol.variant != "ref_free":
        pre["ref_logprobs"] = reference_logprobs(policy, batch, shared, cfg).cpu()
    stats |= {
        "data/rows": float(len(rows)),
        "data/rows_scored": float(len(rows) - sum(given)),
        "data/reward_mean": float(rewards.mean()),
    }
    return pre, stats


def _load_or_precompute(policy, shared, rows, cfg, tok, reward, device, out: Path) -> tuple[dict, dict]:
    """A-LoL's π_ref results, from ``out/precomputed.safetensors`` when resuming (π_θ has moved by then)."""
    path, meta = out / "precomputed.safetensors", out / "precomputed.json"
    if cfg.train.resume and path.exists() and meta.exists():
        pre, stats = load_file(str(path)), json.loads(meta.read_text())
        if pre["rewards"].shape[0] != len(rows):
            raise ConfigError(
                f"{path} holds {pre['rewards'].shape[0]} rows but data.path has {len(rows)}; the data "
                "changed since the run started (use a fresh train.output_dir)"
            )
        return pre, stats
    pre, stats = precompute(policy, shared, rows, cfg, tok, reward, device)
    for target, write in (
        (path, lambda p: save_file({k: v.contiguous() for k, v in pre.items()}, str(p))),
        (meta, lambda p: p.write_text(json.dumps(stats))),
    ):
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        write(tmp)
        os.replace(tmp, target)  # atomic: a crash never leaves half a file
    return pre, stats


# ----------------------------------------------------------------------------------------------- A-LoL: training
def alol_backward(policy, batch: Batch, cfg: ALoLConfig, device) -> tuple[torch.Tensor, dict]:
    """Forward/backward of the A-LoL loss, mean over the rows of ``batch`` (one optimiser step); gradients are left
    in ``.grad``. Returns (loss, metrics averaged over rows)."""
    a, n = cfg.alol, len(batch)
    total, sums = torch.zeros((), device=device), {}
    policy.train()
    for idx, mb, pw in micro_batches(batch, cfg.train.micro_batch_tokens):
        with loop.autocast(device, cfg.train.mixed_precision):
            lp, _ = response_logprobs(policy, mb, pw, 1.0, False)  # (b, rw)
            loss, m = alol_loss(
                lp,
                mb.get("ref_logprobs"),
                mb["response_mask"],
                mb["seq_advantages"],
                variant=a.variant,
                clip=a.clip,
                kl_beta=a.kl_beta,
                reduction="sum",
            )
        (loss / n).backward()  # the mean over the step's rows, whatever the split
        total = total + loss.detach() / n
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(idx) / n
    names = {"alol/advantage": "alol/advantage_mean", "alol/importance_weight": "alol/weight_mean"}
    return total, {names.get(k, k): v for k, v in sums.items() if k != "alol/kept_fraction"}


def _step_rows(step: int, cfg: ALoLConfig, sampler: loop.StepSampler, probs: torch.Tensor | None):
    if probs is None:
        return sampler.rows(step)
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)  # resumable: a function of the step
    return torch.multinomial(probs, cfg.train.batch_size, replacement=True, generator=g).tolist()


def train_alol(cfg: ALoLConfig) -> OfflineRLResult:
    """Run A-LoL as configured (``alignflow alol``); returns the policy, per-step metrics and the final eval."""
    art = resolve_builtin(cfg, "po")  # empty data.path: the task's preference pairs, both responses as rows
    if art is not None and not cfg.data.eval_path:
        cfg.data.eval_path = str(art.eval_prompts_path)
    out, device, tok = start_run(cfg)
    rows, reports = read_offline_rows(cfg.data.path, cfg, tok)
    policy = load_causal_lm(cfg.model, device)
    shared = cfg.model.lora.enabled
    reward = _reward(cfg, cfg.task.name, device, tok.pad_token_id, required=False)
    pre, stats = _load_or_precompute(policy, shared, rows, cfg, tok, reward, device, out)
    keep = alol_keep_mask(pre["advantages"])  # (N,)
    kept = int(keep.sum())
    stats |= {
        "alol/kept_rows": float(kept),
        "alol/dropped_rows": float(len(rows) - kept),
        "alol/kept_fraction": kept / len(rows),
    }
    log.info(
        "A-LoL: %d of %d rows have a positive advantage (%d dropped); value fit explained variance %.3f",
        kept,
        len(rows),
        len(rows) - kept,
        stats["value/explained_var"],
    )
    if kept == 0:
        raise DataError(
            f"{cfg.data.path}: no row has R - V_ref > 0 (mean R {stats['data/reward_mean']:.3f}, "
            f"pi_ref's mean {stats['value/ref_reward_mean']:.3f}); A-LoL has nothing to train on"
        )
    idx = keep.nonzero().flatten()
    train = rows_batch([rows[i] for i in idx.tolist()], tok)
    train["seq_advantages"] = pre["advantages"][idx]  # (K,); not "advantages", a (B, Tr) field
    if "ref_logprobs" in pre:
        train["ref_logprobs"] = pre["ref_logprobs"][idx][:, : train["response_mask"].shape[1]]
    train = train.to(device)
    sampler = loop.StepSampler(kept, cfg.train.batch_size, cfg.train.seed)
    total = sampler.total_steps(cfg.train)
    probs = alol_sampling_weights(pre["advantages"][idx]) if cfg.alol.sampling == "good_priority" else None
    optim = Optimised(policy, cfg.optim, cfg.train, total)
    start = int(loop.resume(out, cfg.train.resume, optim.load).get("step", 0))
    logger = loop.MetricsLogger(out, start=start)
    for r in reports:
        logger.log(start, {"data/report": r})
    logger.log(start, stats)
    result = OfflineRLResult(policy, tok, output_dir=out, stats=stats, precomputed=pre | {"keep": keep})
    bar = loop.Progress(total, start, cfg.train.progress, f"alol/{cfg.alol.variant}")
    for step in range(start, total):
        t0 = time.perf_counter()
        loss, m = alol_backward(policy, train.select(_step_rows(step, cfg, sampler, probs)), cfg, device)
        m |= {"alol/loss": float(loss)} | {f"train/{k}": v for k, v in optim.step({"alol_loss": loss}, step).items()}
        m["perf/step_s"] = time.perf_counter() - t0
        result.history.append(m)
        bar.update(0, loss=m["alol/loss"])
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total:
            logger.log(step + 1, m)
        loop.checkpoint_step(
            step + 1, total, cfg.train, out, lambda path, done=step + 1: optim.save(path, {"step": done})
        )
    bar.close()
    result.eval = _alol_eval(cfg, policy, tok, reward, art, device)
    logger.log(total, result.eval)
    logger.close()
    save_model(policy, tok, out / "model")
    return result


def _alol_eval(cfg: ALoLConfig, policy, tok, reward, art, device) -> dict:
    """Greedy responses to held-out prompts (data.eval_path; the task's held-out prompts by default)."""
    if not cfg.data.eval_path or not cfg.rollout.eval_prompts or reward is None:
        return {}
    rows = read_eval_prompts(cfg.data.eval_path, cfg, tok)
    fields = sorted({k for r in rows for k in r} - {"prompt_ids"})
    rollout = Rollout(policy, tok, cfg.rollout, device, cfg.train.mixed_precision, cfg.train.seed)
    return evaluate(
        Roles(rollout=rollout, actor=None, reward=reward),
        _eval_batch(rows, cfg.rollout.eval_prompts, fields),
        task_gold(cfg, art),
    )
