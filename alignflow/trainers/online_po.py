"""Online / iterative preference optimisation (``alignflow online_po``).

**Iterative DPO** (RLHF Workflow, Dong et al. 2024; docs/online_po.md), one round::

    prompts = next online.prompts_per_round fresh prompts
    y_1..y_n ~ π_θ(·|x)                       rollout.n = 8 (RLHF Workflow), the built-in engine
    r_i     = reward.score(x, y_i)            reward models, task rewards or Python functions
    pair    = (argmax_i r_i, argmin_i r_i)    best vs worst; prompts whose n rewards all tie are skipped
    LP_ref  = reference log-probs of every pair (no grad, once per round)
    online.steps_per_round steps of loss.name (dpo default; any pairwise PREFERENCE_LOSSES key) with po_step

The reference is the initial policy in every round (``online.ref_update=initial``, as RLHF Workflow's code passes
the SFT model as ``ref_model`` each iteration), or the previous round's policy (``previous``: the proximal-point
iteration π_{t+1} = argmin DPO(π; ref = π_t) that APO accelerates).

**INPO** (Zhang et al. 2024): the same rounds with loss ``inpo``: ``(h_t - η/2)²`` where h_t subtracts ητ·log-ratio of
π_ref and (1 - ητ)·log-ratio of π_t, the round-start policy (its log-probs are the rows' ``prev_*_logps``).

**APO** (He, Yuan, Gu 2024): iterative DPO with ref = π_t, where π_t is Nesterov-extrapolated from the two last
round-start policies π̂_t (the current weights) and π̂_{t-1} (a snapshot of the trainable weights):
``LP_ref = (1 + α)·LP_{π̂_t} - α·LP_{π̂_{t-1}}`` (:func:`~alignflow.algorithms.preference.apo_extrapolate`); the
extrapolation's constant cancels in DPO's margin. α = 0 is iterative DPO with ``ref_update=previous`` (tested).

**Nash-MD** (Munos et al. 2023; docs/online_po.md), one round: y ~ π_θ (rollout.n per prompt) and an opponent
y' ~ π_mix ∝ π_θ^(1-β)·π_ref^β per token (:mod:`alignflow.rollout.mixture`, β = online.mixture_coef), the
preference p = P(y ≻ y') = σ((r(y) - r(y'))/scale) (a Bradley-Terry model on the reward sources), then
**Nash-MD-PG** steps (:func:`~alignflow.algorithms.nash.nash_md_pg_loss`). We train Nash-MD-PG rather than an
INPO-style pair loss because it is the estimator the paper derives for Nash-MD (and TRL implements): its gradient
(p - ½)∇LP(y) - β∇KL needs only p, whereas a pair regression against the mixture opponent would treat y and y' as
draws from one distribution, which they are not. With ``prompts_per_round × n = train.batch_size`` and one step per
round (the preset) every step is on-policy, as in the paper.

Departures, on purpose:
* Every round builds a fresh optimiser and schedule (the papers run each iteration as a separate DPO training).
* APO samples from π̂_t, the trained network, not from the extrapolated π_t (which exists only as a pair of
  checkpoints; we could not confirm the paper's practical sampling recipe).
* Dropout is off during training (``model.eval()``), as in ``alignflow po``.
* Evaluation samples (temperature ``rollout.temperature``, a fixed seed, ``online.eval_samples`` per prompt): greedy
  decoding of small models loops and says little about the policy.

Run:  ``alignflow online_po --config configs/online_dpo.yaml`` (inpo.yaml, apo.yaml, nash_md.yaml) (docs/online_po.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignflow.algorithms.nash import bt_win_probability, nash_md_pg_loss
from alignflow.algorithms.preference import apo_extrapolate
from alignflow.algorithms.preference_table import loss_spec, names_where
from alignflow.batch import Batch, cat_rollouts
from alignflow.config import (
    ConfigError,
    OnlinePOConfig,
    POLossConfig,
)
from alignflow.data.collate import token_groups
from alignflow.data.pipeline import prepare_data
from alignflow.distributed.checkpoint import load_checkpoint, save_checkpoint
from alignflow.distributed.save import save_model
from alignflow.models import load_causal_lm
from alignflow.models.sequences import sequence_logps
from alignflow.models.varlen import supports_varlen
from alignflow.rewards.preference_model import PreferenceModel
from alignflow.rollout.mixture import generate_mixture
from alignflow.rollout.sample import sample_batch
from alignflow.rollout.sampling import SamplingParams
from alignflow.trainers import loop
from alignflow.trainers.po import attach_ref, compute_ref_logps
from alignflow.trainers.po_rows import loss_kwargs, po_step
from alignflow.trainers.rl_setup import PromptStream, _frozen_cfg, build_sources, prompt_batch
from alignflow.trainers.roles import RewardRole, Rollout
from alignflow.trainers.setup import resolve_builtin, start_run, task_gold

log = logging.getLogger("alignflow.online_po")


@dataclasses.dataclass
class OnlinePOResult:
    model: torch.nn.Module
    tokenizer: object
    history: list = dataclasses.field(default_factory=list)  # one metrics dict per optimiser step
    rounds: list = dataclasses.field(default_factory=list)  # one dict per round: online/*, means of the steps, eval/*
    evals: list = dataclasses.field(default_factory=list)  # (round, eval metrics): round 0 = the starting policy
    eval: dict = dataclasses.field(default_factory=dict)
    output_dir: Path = Path(".")


# ----------------------------------------------------------------------------------------------- pairs
def best_worst(rewards: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(prompt, best, worst)`` sample indices for each row of ``rewards`` (P, n) whose n rewards do not all tie;
    best is the first argmax, worst the first argmin."""
    best, worst = rewards.argmax(dim=1).tolist(), rewards.argmin(dim=1).tolist()  # (P,) each
    tied = (rewards.max(dim=1).values == rewards.min(dim=1).values).tolist()
    return [(i, b, w) for i, (b, w, t) in enumerate(zip(best, worst, tied, strict=False)) if not t]


def _sequences(batch: Batch) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's real prompt tokens and response tokens (the response's ending EOS included)."""
    p, pm = batch["prompt_ids"].cpu(), batch["prompt_mask"].cpu().bool()  # (B, Tp)
    y, ym = batch["response_ids"].cpu(), batch["response_mask"].cpu().bool()  # (B, Tr)
    return [p[i][pm[i]].tolist() for i in range(len(batch))], [y[i][ym[i]].tolist() for i in range(len(batch))]


def pair_rows(batch: Batch, rewards: torch.Tensor, n: int) -> tuple[list[dict], dict]:
    """Best-vs-worst preference rows (the encoded-row layout of ``alignflow po``) from a rollout batch of P prompts x
    n samples and its (P*n,) rewards, with the pair's rewards as ``chosen_rewards``/``rejected_rewards``."""
    prompts, responses = _sequences(batch)
    r = rewards.float().cpu().view(-1, n)  # (P, n)
    rows = []
    for i, b, w in best_worst(r):
        p, yw, yl = prompts[i * n], responses[i * n + b], responses[i * n + w]
        rows.append(
            {
                "chosen_ids": p + yw,
                "chosen_mask": [0] * len(p) + [1] * len(yw),
                "rejected_ids": p + yl,
                "rejected_mask": [0] * len(p) + [1] * len(yl),
                "prompt_len": len(p),
                "chosen_rewards": float(r[i, b]),
                "rejected_rewards": float(r[i, w]),
            }
        )
    mean = lambda key: sum(x[key] for x in rows) / len(rows) if rows else float("nan")  # noqa: E731
    return rows, {
        "online/pairs": float(len(rows)),
        "online/tied_prompts": float(r.shape[0] - len(rows)),
        "online/reward_mean": float(r.mean()),
        "online/reward_chosen": mean("chosen_rewards"),
        "online/reward_rejected": mean("rejected_rewards"),
        "online/response_len": float(batch["response_mask"].sum(-1).float().mean()),
    }


# ----------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class OnlineRun:
    """What a round needs: the policy, its rollout and reward roles, and the references."""

    cfg: OnlinePOConfig
    policy: torch.nn.Module
    tok: object
    device: torch.device
    rollout: Rollout
    reward: RewardRole
    kw: dict
    fixed_ref: torch.nn.Module | None = None  # ref_model, or a frozen copy of the initial policy (loaded lazily)
    prev: dict | None = None  # APO: the previous round-start policy's trainable weights
    pm: object = None  # Nash-MD: a PreferenceModel (online.preference_model) giving P(y ≻ y') instead of BT

    def initial_reference(self, r: int):
        """(module, context) computing π_ref: ``ref_model``; the LoRA policy with adapters disabled; the policy itself
        in round 0 (not yet updated: no copy); else a frozen copy of the initial weights."""
        c = self.cfg
        if c.model.lora.enabled and not c.ref_model:
            return self.policy, self.policy.disable_adapter
        if not c.ref_model and r == 0:
            return self.policy, contextlib.nullcontext
        if self.fixed_ref is None:
            self.fixed_ref = load_causal_lm(_frozen_cfg(c, c.ref_model or c.model.name_or_path), self.device)
            self.fixed_ref.requires_grad_(False).eval()
        return self.fixed_ref, contextlib.nullcontext


def snapshot(model) -> dict:
    """Copies of the trainable weights (all of them, or the LoRA adapters)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def swapped(model, weights: dict):
    """Run the block with ``weights`` loaded into ``model``; the current weights are restored afterwards."""
    params = dict(model.named_parameters())
    keep = {n: params[n].detach().clone() for n in weights}
    with torch.no_grad():
        for n, v in weights.items():
            params[n].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, v in keep.items():
                params[n].copy_(v)


def _check(cfg: OnlinePOConfig) -> None:
    o, name = cfg.online, cfg.loss.name
    if cfg.train.max_steps:
        raise ConfigError(
            "train.max_steps is not used by online_po: set online.rounds and online.steps_per_round "
            "(or online.epochs_per_round)"
        )
    if o.preference_model and o.method != "nash_md":
        raise ConfigError(f"online.preference_model is read by online.method=nash_md only (method is {o.method})")
    if o.method == "nash_md":
        if cfg.loss != POLossConfig():
            raise ConfigError(
                "online.method=nash_md trains the Nash-MD-PG objective: leave loss.* unset (its KL "
                "coefficient is online.kl_coef)"
            )
        if cfg.rollout.stop_strings:
            raise ConfigError("online.method=nash_md: rollout.stop_strings are not supported by the mixture sampler")
        return
    spec = loss_spec(name)
    if not spec.pairwise:
        raise ConfigError(
            f"loss.name={name} trains on {spec.data} rows; online_po builds (chosen, rejected) pairs: "
            f"use a pairwise loss ({', '.join(names_where(pairwise=True))})"
        )
    if "users" in spec.extra:
        raise ConfigError(f"loss.name={name}: online pairs carry no user; P-DPO trains in alignflow po (docs/p_dpo.md)")
    previous = [n for n in names_where(pairwise=True) if "previous" in loss_spec(n).extra]
    if (o.method == "inpo") != ("previous" in spec.extra):
        raise ConfigError(
            f"online.method={o.method} with loss.name={name}: method inpo trains loss "
            f"{' or '.join(previous)} (and a loss of the previous iterate needs the previous round's "
            "policy, i.e. method inpo)"
        )
    if o.method == "apo" and not spec.reference:
        raise ConfigError(f"online.method=apo extrapolates the reference, but loss.name={name} uses none")


def build_run(cfg: OnlinePOConfig, device, tok) -> OnlineRun:
    policy = load_causal_lm(cfg.model, device)
    policy.eval()  # dropout off (module docstring); gradients flow as usual
    reward = build_sources(cfg.reward, "reward", cfg.task.name, cfg, device, tok.pad_token_id)
    if reward is None:
        raise ConfigError("no reward source: set reward.task (e.g. {gold: 1.0}), reward.functions or reward.models")
    if cfg.reward.normalize != "none" or cfg.reward.clip:
        raise ConfigError(
            "reward.normalize / reward.clip are online-RL options; set them to none / 0 here (pairs "
            "are ranked by the raw reward)"
        )
    kw = {} if cfg.online.method == "nash_md" else loss_kwargs(cfg.loss)
    rollout = Rollout(policy, tok, cfg.rollout, device, cfg.train.mixed_precision, cfg.train.seed)
    pm = None
    if cfg.online.preference_model:
        pm = PreferenceModel(cfg.online.preference_model, device, budget=cfg.train.micro_batch_tokens)
    return OnlineRun(cfg, policy, tok, device, rollout, RewardRole(reward), kw, pm=pm)


def generate(run: OnlineRun, prompts: Batch) -> Batch:
    """``rollout.n`` samples of the policy per prompt, ``rollout.prompts_per_step`` prompts per engine call, scored."""
    parts = [run.rollout.generate(p) for p in prompts.split(run.cfg.rollout.prompts_per_step)]
    batch = cat_rollouts(parts)
    return batch.union(run.reward.score(batch))


# ----------------------------------------------------------------------------------------------- references
def _logps(run: OnlineRun, model, rows: list[dict], ctx=contextlib.nullcontext, treg=None) -> dict:
    with ctx(), loop.autocast(run.device, run.cfg.train.mixed_precision):
        return compute_ref_logps(model, rows, run.device, run.cfg.train.micro_batch_tokens, run.cfg.train.packing, treg)


def _treg_ids(run: OnlineRun):
    enc = lambda text: run.tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(run.cfg.loss.treg_pos_instruction), enc(run.cfg.loss.treg_neg_instruction), run.tok.bos_token_id


def reference_rows(run: OnlineRun, rows: list[dict], r: int) -> list[dict]:
    """The round's rows with ``ref_*`` (and INPO's ``prev_*``) log-probs, computed once before its updates."""
    o, spec = run.cfg.online, loss_spec(run.cfg.loss.name)
    treg = _treg_ids(run) if "token_rewards" in spec.extra else None
    values: dict = {}
    if spec.reference:
        previous = r > 0 and (o.method == "apo" or (o.method == "iterative_dpo" and o.ref_update == "previous"))
        if previous:
            values = _logps(run, run.policy, rows)  # π̂_t: the round-start weights
            if o.method == "apo":
                old = _logps(run, run.policy, rows, lambda: swapped(run.policy, run.prev))  # π̂_{t-1}
                values = {k: apo_extrapolate(v, old[k], o.apo_alpha) for k, v in values.items()}
            if treg is not None:  # T-REG's token rewards always come from π_ref under the contrastive prompts
                model, ctx = run.initial_reference(r)
                values |= {k: v for k, v in _logps(run, model, rows, ctx, treg).items() if "token_rewards" in k}
        else:
            model, ctx = run.initial_reference(r)
            values = _logps(run, model, rows, ctx, treg)
    if o.method == "inpo":  # π_t = the round-start policy
        cur = _logps(run, run.policy, rows)
        values |= {"prev_chosen_logps": cur["ref_chosen_logps"], "prev_rejected_logps": cur["ref_rejected_logps"]}
    return attach_ref(rows, values) if values else rows


# ----------------------------------------------------------------------------------------------- Nash-MD
def nash_rows(run: OnlineRun, prompts: Batch, r: int) -> tuple[list[dict], dict]:
    """Policy samples y and mixture opponents y' for each prompt, p = P(y ≻ y'), and π_ref's token log-probs of y."""
    cfg, n = run.cfg, run.cfg.rollout.n
    t0 = time.perf_counter()
    ours = generate(run, prompts)
    ref, ctx = run.initial_reference(r)
    parts = []
    for chunk in prompts.split(cfg.rollout.prompts_per_step):
        params = SamplingParams(
            n=n,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            max_new_tokens=cfg.rollout.max_new_tokens,
            seed=cfg.train.seed * 1_000_003 + int(chunk["group"][0]) + 500_009,
        )
        with loop.autocast(run.device, cfg.train.mixed_precision):
            opp = generate_mixture(
                run.policy,
                ref,
                [list(p) for p in chunk["prompt_token_ids"]],
                params,
                cfg.online.mixture_coef,
                eos_ids=run.rollout.engine.eos_ids,
                pad_id=run.rollout.engine.pad_id,
                ref_context=ctx,
            )
        meta = Batch(meta={k: v for k, v in chunk.meta.items() if k != "prompt_token_ids"}).repeat(n)
        ids, mask = opp["response_ids"], opp["response_mask"]
        texts = run.tok.batch_decode(
            [y[m.bool()].tolist() for y, m in zip(ids, mask, strict=False)], skip_special_tokens=True
        )
        parts.append(opp.union(meta).union(Batch(meta={"response": texts})))
    theirs = cat_rollouts(parts)
    theirs = theirs.union(run.reward.score(theirs))
    gen_s = time.perf_counter() - t0
    if run.pm is not None:  # a pairwise preference model reads both responses
        p = run.pm.win_prob(ours["prompt"], ours["response"], theirs["response"])
    else:
        p = bt_win_probability(
            ours["scores"].float().cpu(), theirs["scores"].float().cpu(), cfg.online.preference_scale
        )
    prompt_ids, responses = _sequences(ours)
    seqs = [(x + y, [0] * len(x) + [1] * len(y)) for x, y in zip(prompt_ids, responses, strict=False)]
    ref_lp = []
    flat = cfg.train.packing
    with torch.no_grad(), ctx(), loop.autocast(run.device, cfg.train.mixed_precision):
        for g in token_groups([len(s) for s, _ in seqs], cfg.train.micro_batch_tokens):
            out = sequence_logps(ref, [seqs[i] for i in g], run.device, flat, with_tokens=True)
            ref_lp += [out["token_logps"][j, : int(out["lengths"][j])].float().cpu().tolist() for j in range(len(g))]
    rows = [
        {"ids": s, "mask": m, "win_prob": float(pi), "ref_token_logps": lp}
        for (s, m), pi, lp in zip(seqs, p.tolist(), ref_lp, strict=False)
    ]
    mine, other = ours["scores"].float().cpu(), theirs["scores"].float().cpu()
    win = mine >= other
    return rows, {
        "online/pairs": float(len(rows)),
        "online/reward_mean": float(mine.mean()),
        "online/reward_mixture": float(other.mean()),
        "online/reward_chosen": float(torch.where(win, mine, other).mean()),
        "online/reward_rejected": float(torch.where(win, other, mine).mean()),
        "online/win_prob": float(p.mean()),
        "online/response_len": float(ours["response_mask"].sum(-1).float().mean()),
        "perf/gen_s": gen_s,
    }


def nash_step(run: OnlineRun, rows: list[dict]) -> tuple[dict, int]:
    """Forward/backward of the Nash-MD-PG loss over one step's rows (mean over rows, whatever the micro-batches)."""
    cfg, dev = run.cfg, run.device
    flat = cfg.train.packing and supports_varlen(run.policy)
    sums, tokens = {}, 0
    for g in token_groups([len(r["ids"]) for r in rows], cfg.train.micro_batch_tokens):
        chunk = [rows[i] for i in g]
        with loop.autocast(dev, cfg.train.mixed_precision):
            out = sequence_logps(run.policy, [(r["ids"], r["mask"]) for r in chunk], dev, flat, with_tokens=True)
        width = out["token_logps"].shape[1]
        ref = torch.tensor(
            [r["ref_token_logps"] + [0.0] * (width - len(r["ref_token_logps"])) for r in chunk], device=dev
        )  # (b, Tr)
        p = torch.tensor([r["win_prob"] for r in chunk], device=dev)  # (b,)
        total, m = nash_md_pg_loss(
            out["token_logps"], ref, out["token_mask"], p, beta=cfg.online.kl_coef, reduction="sum"
        )
        (total / len(rows)).backward()
        for k, v in [("loss", total.detach() / len(chunk))] + list(m.items()):
            sums[k] = sums.get(k, 0.0) + float(v) * len(chunk) / len(rows)
        tokens += sum(len(r["ids"]) for r in chunk)
    return sums, tokens


# ----------------------------------------------------------------------------------------------- a round
def train_round(
    run: OnlineRun, rows: list[dict], r: int, step: int, logger, result: OnlinePOResult
) -> tuple[int, dict]:
    """The round's optimiser steps (fresh optimiser); returns (global step, means of the step metrics)."""
    cfg = run.cfg
    steps = cfg.online.steps_per_round or math.ceil(cfg.online.epochs_per_round * len(rows) / cfg.train.batch_size)
    if not rows or not steps:
        log.warning("round %d: no pairs to train on (every prompt's samples tied)", r + 1)
        return step, {}
    sampler = loop.StepSampler(len(rows), cfg.train.batch_size, cfg.train.seed * 1009 + r)
    opt = loop.build_optimizer(run.policy, cfg.optim)
    sched = loop.build_scheduler(opt, cfg.optim, steps)
    sums: dict = {}
    for s in range(steps):
        t0 = time.perf_counter()
        picked = [rows[i] for i in sampler.rows(s)]
        if cfg.online.method == "nash_md":
            metrics, ntok = nash_step(run, picked)
        else:
            metrics, ntok = po_step(run.policy, picked, cfg.loss.name, run.kw, cfg.train, run.device)
        if loop.guard_loss(step, cfg.train, {cfg.online.method: torch.tensor(metrics["loss"])}):
            metrics["grad_norm"], _ = loop.optimizer_step(
                run.policy, opt, sched, cfg.train, cfg.optim.max_grad_norm, step
            )
        else:
            opt.zero_grad(set_to_none=True)
        step += 1
        metrics |= {"lr": sched.get_last_lr()[0], "perf/tokens_per_s": ntok / (time.perf_counter() - t0)}
        metrics = {k if "/" in k else f"train/{k}": v for k, v in metrics.items()} | {"online/round": r + 1}
        result.history.append(metrics)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v / steps
        if step % cfg.train.log_every == 0:
            logger.log(step, metrics)
    return step, sums


def play_round(run: OnlineRun, stream: PromptStream, r: int, step: int, logger, result) -> tuple[int, dict]:
    """Sample, label and train one round; returns (global step, the round's metrics)."""
    cfg = run.cfg
    prompts = stream.take(cfg.online.prompts_per_round)
    if cfg.online.method == "nash_md":
        rows, m = nash_rows(run, prompts, r)
    else:
        t0 = time.perf_counter()
        batch = generate(run, prompts)
        rows, m = pair_rows(batch, batch["scores"], cfg.rollout.n)
        m["perf/gen_s"] = time.perf_counter() - t0
        rows = reference_rows(run, rows, r) if rows else rows
    if cfg.online.method == "apo":
        run.prev = snapshot(run.policy)  # π̂_t, for the extrapolation of the next round's reference
    step, means = train_round(run, rows, r, step, logger, result)
    return step, means | m | {"online/round": r + 1}


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def sampled_eval(run: OnlineRun, prompts: Batch, gold=None) -> dict:
    """``online.eval_samples`` samples per held-out prompt (fixed seed, sampling temperature): ``eval/reward_mean``
    (the training reward), ``eval/response_len`` and, for built-in tasks, ``eval/gold_reward``."""
    if not len(prompts):
        return {}
    cfg, n = run.cfg, run.cfg.online.eval_samples
    with loop.autocast(run.device, cfg.train.mixed_precision):
        batch = sample_batch(
            run.policy,
            run.tok,
            [list(p) for p in prompts["prompt_token_ids"]],
            n,
            cfg.rollout.max_new_tokens,
            cfg.rollout.temperature,
            cfg.train.seed + 424_242,
        )
    batch = batch.union(Batch(meta={k: v for k, v in prompts.meta.items() if k != "prompt_token_ids"}).repeat(n))
    scores = run.reward.score(batch)["scores"].float()
    m = {
        "eval/reward_mean": float(scores.mean()),
        "eval/response_len": float(batch["response_mask"].sum(-1).float().mean()),
    }
    if gold is not None:
        m["eval/gold_reward"] = sum(gold(batch["prompt"], batch["response"])) / len(batch)
    return m


# ----------------------------------------------------------------------------------------------- checkpoints
def _save(run: OnlineRun, out: Path, r: int, step: int, stream: PromptStream) -> None:
    """APO's snapshot first (a crash in between leaves the previous complete checkpoint in charge), then the policy
    with the round state under ``checkpoints/step-N``."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    if run.prev is not None:
        tmp = root / f".apo_prev-{step}.tmp-{os.getpid()}"
        save_file({k: v.contiguous() for k, v in run.prev.items()}, str(tmp))
        os.replace(tmp, root / f"apo_prev-{step}.safetensors")
    save_checkpoint(
        root / f"step-{step}", run.policy, state={"step": step, "round": r + 1, "prompt_position": stream.position}
    )


def _load(run: OnlineRun, out: Path, stream: PromptStream, ckpt: Path) -> dict:
    """Restore a round-end checkpoint (:func:`loop.resume` hands it over): the policy, the prompt position and
    APO's previous iterate."""
    state = load_checkpoint(ckpt, run.policy)
    stream.position = int(state["prompt_position"])
    prev = out / "checkpoints" / f"apo_prev-{state['step']}.safetensors"
    if run.cfg.online.method == "apo" and prev.exists():
        run.prev = load_file(str(prev), device=str(run.device))
    return state


# ----------------------------------------------------------------------------------------------- entry point
def train_online_po(cfg: OnlinePOConfig) -> OnlinePOResult:
    """Run online / iterative preference optimisation as configured (``alignflow online_po``)."""
    _check(cfg)
    art = resolve_builtin(cfg, "rl")
    if art is not None and not cfg.data.eval_path:
        cfg.data.eval_path = str(art.eval_prompts_path)
    out, device, tok = start_run(cfg)
    data = prepare_data(cfg.data, tok, expect=("prompt",), seed=cfg.train.seed)
    run = build_run(cfg, device, tok)
    stream = PromptStream(data.train, cfg.train.seed)
    held = data.eval[: cfg.rollout.eval_prompts]
    eval_prompts = prompt_batch(held, [10**9 + i for i in range(len(held))], stream.fields)
    gold = task_gold(cfg, art)
    state = loop.resume(out, cfg.train.resume, lambda ckpt: _load(run, out, stream, ckpt))
    start, step = int(state.get("round", 0)), int(state.get("step", 0))
    logger = loop.MetricsLogger(out, start=step)
    for rep in data.reports:
        logger.log(step, {"data/report": rep})
    result = OnlinePOResult(run.policy, tok, output_dir=out)
    if start == 0:
        result.evals.append((0, sampled_eval(run, eval_prompts, gold)))
        logger.log(0, result.evals[-1][1])
    bar = loop.Progress(cfg.online.rounds, start, cfg.train.progress, f"online_po/{cfg.online.method}")
    for r in range(start, cfg.online.rounds):
        step, m = play_round(run, stream, r, step, logger, result)
        ev = sampled_eval(run, eval_prompts, gold)
        result.rounds.append(m | ev)
        result.evals.append((r + 1, ev))
        logger.log(step, m | ev)
        bar.update(0, reward=m.get("online/reward_mean", float("nan")))
        loop.checkpoint_step(
            r + 1,
            cfg.online.rounds,
            cfg.train,
            out,
            lambda _, r=r, step=step: _save(run, out, r, step, stream) or out / "checkpoints" / f"step-{step}",
        )
    bar.close()
    result.eval = result.evals[-1][1] if result.evals else {}
    logger.close()
    save_model(run.policy, tok, out / "model")
    return result
