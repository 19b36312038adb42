"""``alignflow cgpo``: CGPO, a mixture of judges as constraints (Xu et al. 2024, "The Perfect Blend"; docs/cgpo.md).

One step, for P = ``rollout.prompts_per_step`` prompts and G = ``rollout.n`` samples each::

    batch = rollout.generate(prompts)                        P * G rows; rows g*G .. g*G+G-1 are prompt g's
    r     = reward(batch)                                    per row: the reward source of its prompt's 'task'
    V     = judges(batch)                                    (P*G, J) violation flags, rule and LLM judges
    r_anc = mean of the group's r  |  r(x, anchor response)  (cgpo.anchor)
    loss  = crpg | codpo | crraft (alignflow.algorithms.cgpo) on the summed response log-probs;  one optimiser step

Per-task rewards: a prompt row's ``task`` field picks its source in ``cgpo.task_rewards`` (a reward-model
directory or a ``module:function``); rows without one use the ``reward:`` section. A ``task`` value with no
source is an error naming the row, never a silent default.

Departures, on purpose:
* the calibrated reward's anchor defaults to the mean reward of the prompt's own samples (the built-in prompts
  carry no reference answer); ``cgpo.anchor=field`` uses a row's reference response, as in the paper;
* the log-probabilities of a step's rows are summed over their tokens and the loss is taken over the whole step
  in one backward pass (the loss functions see all rows at once), so a step's graphs are held together: keep
  ``prompts_per_step * n`` moderate for large models;
* log-probabilities are the policy's own (temperature 1), whatever ``rollout.temperature`` samples with.

Run:  ``alignflow cgpo --config configs/cgpo_crpg.yaml`` (also cgpo_codpo.yaml, cgpo_crraft.yaml).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from alignflow.algorithms.cgpo import (
    calibrated_reward,
    codpo_loss,
    codpo_pairs,
    constraint_satisfaction,
    crpg_loss,
    crraft_loss,
    crraft_select,
    judge_violations,
)
from alignflow.batch import Batch
from alignflow.config import CGPOConfig, ConfigError, RewardSourceConfig
from alignflow.data.formats import DataError
from alignflow.data.pipeline import prepare_data
from alignflow.models import load_causal_lm
from alignflow.rewards.judge import JudgeReward, build_judge
from alignflow.rewards.rules import CallableReward, RewardLoadError, reward_options
from alignflow.trainers import loop
from alignflow.trainers.offline_common import OfflineRLResult, _reward, prompt_step_loop
from alignflow.trainers.rl_setup import _frozen_cfg, build_sources
from alignflow.trainers.roles import Optimised, Reference, RewardRole, Rollout, micro_batches, response_logprobs
from alignflow.trainers.setup import resolve_builtin, start_run, task_gold

log = logging.getLogger("alignflow.cgpo")


# ----------------------------------------------------------------------------------------------- rewards
class TaskRewards:
    """``score(batch) -> Batch{"scores": (B,)}``: each row scored by the source of its ``task`` meta field
    (``by_task``), or by ``default`` when the row has no task (or no per-task source is configured at all)."""

    def __init__(self, default: RewardRole | None, by_task: dict[str, RewardRole]):
        self.default, self.by_task = default, by_task

    def _source(self, i: int, task, prompt) -> str | None:
        if task in (None, ""):
            if self.default is None:
                raise DataError(
                    f"prompt {prompt!r:.60} (row {i} of the step) has no 'task' field and the reward section has "
                    "no source; give the row one of "
                    f"{', '.join(self.by_task)} or set reward.task / reward.functions / reward.models"
                )
            return None
        if task not in self.by_task:
            raise DataError(
                f"prompt {prompt!r:.60} (row {i} of the step): task {task!r} has no reward in "
                f"cgpo.task_rewards; valid: {', '.join(self.by_task)}"
            )
        return str(task)

    def score(self, batch: Batch) -> Batch:
        # rows are routed by their task only when per-task rewards are configured
        tasks = batch.meta["task"] if "task" in batch.meta and self.by_task else [None] * len(batch)
        rows: dict[str | None, list[int]] = {}
        for i, t in enumerate(tasks):
            rows.setdefault(self._source(i, t, batch.meta["prompt"][i]), []).append(i)
        out = torch.zeros(len(batch))
        for key, idx in rows.items():
            role = self.default if key is None else self.by_task[key]
            out[idx] = role.score(batch.select(idx))["scores"].float().cpu()
        return Batch({"scores": out})


def build_rewards(cfg: CGPOConfig, device, pad_id: int) -> TaskRewards:
    """The ``reward:`` section as the default source and one source per ``cgpo.task_rewards`` entry."""
    default = _reward(cfg, cfg.task.name, device, pad_id, required=not cfg.cgpo.task_rewards)
    by_task = {}
    for task, spec in cfg.cgpo.task_rewards.items():
        is_fn = ":" in spec and not Path(spec).is_dir()
        section = RewardSourceConfig(functions={spec: 1.0}) if is_fn else RewardSourceConfig(models=[spec])
        try:
            by_task[task] = RewardRole(
                build_sources(section, f"cgpo.task_rewards.{task}", cfg.task.name, cfg, device, pad_id)
            )
        except RewardLoadError as e:
            raise ConfigError(f"cgpo.task_rewards.{task}: {e}") from None
    return TaskRewards(default, by_task)


# ----------------------------------------------------------------------------------------------- judges
SatisfiedFn = Callable[[Batch], list]  # batch -> one truthy value per row: the row satisfies the constraint


def _rule_judge(fn: CallableReward) -> SatisfiedFn:
    def satisfied(batch: Batch) -> list:
        fields = {k: v for k, v in batch.meta.items() if k not in ("prompt", "response")}
        return [v >= 0.5 for v in fn.scores(batch.meta["prompt"], batch.meta["response"], fields)]

    return satisfied


def _llm_judge(judge: JudgeReward) -> SatisfiedFn:
    return lambda batch: [v >= 0.5 for v in judge.score(batch)[0].tolist()]


def build_judges(cfg: CGPOConfig, device) -> dict[str, SatisfiedFn]:
    """Rule judges (``cgpo.rule_judges``) then one LLM judge per principle (``cgpo.principles``), in config order."""
    judges: dict[str, SatisfiedFn] = {}
    for name, spec in cfg.cgpo.rule_judges.items():
        try:
            judges[name] = _rule_judge(CallableReward(spec, name=name, **reward_options(cfg.reward)))
        except RewardLoadError as e:
            raise ConfigError(f"cgpo.rule_judges.{name}: {e}") from None
    if cfg.cgpo.principles:
        jcfg = dataclasses.replace(cfg.cgpo.judge, template="principle")
        base = build_judge(jcfg, device, cfg.train.seed, "cgpo.judge")  # one backend for every principle
        for name, text in cfg.cgpo.principles.items():
            one = copy.copy(base)  # shares the backend and the verdict cache (keys include the principle)
            one.principles, one.name = [text], name
            judges[name] = _llm_judge(one)
    return judges


def violations(judges: dict[str, SatisfiedFn], batch: Batch) -> torch.Tensor:
    """(B, J) violation flags of ``batch`` (1 = the judge says the row breaks its constraint)."""
    fns = {name: (lambda _p, _r, j=j: j(batch)) for name, j in judges.items()}
    return judge_violations(fns, batch.meta["prompt"], batch.meta["response"])


# ----------------------------------------------------------------------------------------------- the step
@dataclasses.dataclass
class CGPORun:
    """What one CGPO step needs."""

    cfg: CGPOConfig
    policy: nn.Module
    ref: Reference | None  # codpo only
    rollout: Rollout
    rewards: TaskRewards
    judges: dict[str, SatisfiedFn]
    optim: Optimised
    device: torch.device
    gold: Callable | None = None


def anchor_rewards(run: CGPORun, batch: Batch, r: torch.Tensor, G: int) -> torch.Tensor:
    """(P*G,) r_anchor of every row: its group's mean reward, or the reward of its prompt's anchor response."""
    if run.cfg.cgpo.anchor == "group_mean":
        return r.view(-1, G).mean(1).repeat_interleave(G)
    key, firsts = run.cfg.cgpo.anchor_field, list(range(0, len(batch), G))
    values = batch.meta.get(key) if key in batch.meta else None
    for g in firsts:
        if not isinstance(values[g] if values is not None else None, str):
            raise DataError(f"prompt {batch.meta['prompt'][g]!r:.60}: no {key!r} response (cgpo.anchor_field)")
    rows = batch.select(firsts)
    anchors = Batch(meta={**rows.meta, "response": [values[g] for g in firsts]})
    return run.rewards.score(anchors)["scores"].repeat_interleave(G)


def row_logps(run: CGPORun, batch: Batch, rows: list[int]) -> torch.Tensor:
    """(len(rows),) summed response log-probabilities of ``rows`` under the policy, with their graph."""
    sub = batch.select(rows)
    idx_parts, vals = [], []
    run.policy.train()
    with loop.autocast(run.device, run.cfg.train.mixed_precision):
        for idx, mb, pw in micro_batches(sub, run.cfg.train.micro_batch_tokens):
            if not len(idx):
                continue
            lp, _ = response_logprobs(run.policy, mb, pw, 1.0, False)  # (b, rw)
            idx_parts.append(idx)
            vals.append((lp.float() * mb["response_mask"].float()).sum(-1))
    order, values = torch.cat(idx_parts).to(run.device), torch.cat(vals)
    return torch.zeros(len(rows), device=run.device).index_put((order,), values)


def cgpo_loss(run: CGPORun, batch: Batch, r: torch.Tensor, anchor: torch.Tensor, V: torch.Tensor) -> tuple:
    """(loss or None when no row counts, metrics, per-row CRPG weights or None) of the configured update."""
    c, G, N = run.cfg.cgpo, run.cfg.rollout.n, len(batch)
    dev, groups = run.device, [slice(g * G, (g + 1) * G) for g in range(len(batch) // run.cfg.rollout.n)]
    r, anchor, V = r.to(dev), anchor.to(dev), V.to(dev)
    if c.update == "crpg":
        loss, w = crpg_loss(row_logps(run, batch, list(range(N))), r, anchor, V)
        return (loss if bool((w > 0).any()) else None), {"cgpo/weight_mean": float(w.mean())}, w
    if c.update == "crraft":
        kept = [k for s in groups if (k := crraft_select(r[s], V[s])) is not None]
        m = {"cgpo/kept": float(len(kept))}
        return (crraft_loss(row_logps(run, batch, list(range(N))), r, anchor, V, G) if kept else None), m, None
    pairs = [(s.start + a, s.start + b) for s in groups for a, b in codpo_pairs(r[s], V[s])]
    if not pairs:
        return None, {"cgpo/pairs": 0.0}, None
    rows = [i for p in pairs for i in p]  # chosen, rejected, chosen, rejected, ...
    lp = row_logps(run, batch, rows)
    mask = batch["response_mask"]
    ref = (run.ref.logprobs(batch.select(rows))["ref_logprobs"] * mask[rows].to(dev).float()).sum(-1)
    ch = torch.tensor([p[0] for p in pairs])
    len_c = mask[ch].float().sum(-1).clamp(min=1).to(dev)
    loss = codpo_loss(lp[0::2], ref[0::2], lp[1::2], ref[1::2], len_c, beta=c.beta, lam=c.lam)
    return loss, {"cgpo/pairs": float(len(pairs))}, None


def cgpo_step(run: CGPORun, prompts: Batch, step: int) -> dict:
    """One CGPO step (the algorithm box of the module docstring); returns its metrics (and ``_weights``)."""
    t0 = time.perf_counter()
    G = run.cfg.rollout.n
    batch = run.rollout.generate(prompts)
    gen_s = time.perf_counter() - t0
    r = run.rewards.score(batch)["scores"].float().cpu()  # (P*G,)
    V = violations(run.judges, batch)  # (P*G, J)
    anchor = anchor_rewards(run, batch, r, G).float().cpu()
    m = constraint_satisfaction(V, list(run.judges))
    m |= {
        "cgpo/feasible_share": m["constraints/all"],
        "cgpo/reward_mean": float(r.mean()),
        "cgpo/calibrated_reward": float(calibrated_reward(r, anchor).mean()),
        "cgpo/response_len": float(batch["response_mask"].sum(-1).float().mean()),
        "perf/gen_s": gen_s,
    }
    if run.gold is not None:
        m["cgpo/gold_mean"] = sum(run.gold(batch.meta["prompt"], batch.meta["response"])) / len(batch)
    loss, lm, weights = cgpo_loss(run, batch, r, anchor, V)
    m |= lm
    if loss is None:  # nothing feasible to learn from: no optimiser step (Adam's momentum would still move)
        run.optim.opt.zero_grad(set_to_none=True)
        m |= {"cgpo/loss": 0.0, "train/skipped": 1.0}
    else:
        loss.backward()
        out = run.optim.step({"cgpo_loss": loss.detach()}, str(step))
        m |= {"cgpo/loss": float(loss.detach())} | {f"train/{k}": float(v) for k, v in out.items()}
    m["perf/step_s"] = time.perf_counter() - t0
    if weights is not None:
        m["_weights"] = weights.detach().cpu()
    return m


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate_cgpo(run: CGPORun, prompts: Batch, chunk: int = 64) -> dict:
    """Greedy responses to held-out prompts: ``eval/reward_mean``, ``eval/constraints/<judge>`` and
    ``eval/constraints/all``, ``eval/response_len`` and, for built-in tasks, ``eval/gold_reward``."""
    if not len(prompts):
        return {}
    rs, vs, lens, golds = [], [], [], []
    for piece in prompts.split(chunk):
        out = run.rollout.generate(piece, greedy=True)
        rs.append(run.rewards.score(out)["scores"].float().cpu())
        vs.append(violations(run.judges, out))
        lens.append(out["response_mask"].sum(-1).float().cpu())
        if run.gold is not None:
            golds += list(run.gold(out.meta["prompt"], out.meta["response"]))
    sat = constraint_satisfaction(torch.cat(vs), list(run.judges))
    m = {"eval/reward_mean": float(torch.cat(rs).mean()), "eval/response_len": float(torch.cat(lens).mean())}
    m |= {f"eval/{k}": v for k, v in sat.items()}
    if golds:
        m["eval/gold_reward"] = sum(golds) / len(golds)
    return m


# ----------------------------------------------------------------------------------------------- the run
def build_cgpo_run(cfg: CGPOConfig, device, tok, total_steps: int, gold=None) -> CGPORun:
    """Policy, CODPO's reference (a frozen copy, or the policy with its LoRA adapters off), roles and judges."""
    policy = load_causal_lm(cfg.model, device)
    policy.train()
    ref = None
    if cfg.cgpo.update == "codpo":
        budget = cfg.train.micro_batch_tokens
        if cfg.model.lora.enabled:
            ref = Reference(lora_actor=policy, budget=budget, device=device, mixed_precision=cfg.train.mixed_precision)
        else:
            frozen = load_causal_lm(_frozen_cfg(cfg, cfg.model.name_or_path), device)
            ref = Reference(model=frozen, budget=budget, device=device, mixed_precision=cfg.train.mixed_precision)
    rollout = Rollout(policy, tok, cfg.rollout, device, cfg.train.mixed_precision, cfg.train.seed)
    rewards = build_rewards(cfg, device, tok.pad_token_id)
    judges = build_judges(cfg, device)
    optim = Optimised(policy, cfg.optim, cfg.train, total_steps)
    return CGPORun(cfg, policy, ref, rollout, rewards, judges, optim, device, gold)


def train_cgpo(cfg: CGPOConfig) -> OfflineRLResult:
    """Run CGPO as configured (``alignflow cgpo``); returns the policy, per-step metrics and the final eval."""
    art = resolve_builtin(cfg, "rl")
    if art is not None and not cfg.data.eval_path:
        cfg.data.eval_path = str(art.eval_prompts_path)
    out, device, tok = start_run(cfg)
    data = prepare_data(cfg.data, tok, expect=("prompt",), seed=cfg.train.seed)
    P = cfg.rollout.prompts_per_step
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * len(data.train) / P))
    run = build_cgpo_run(cfg, device, tok, total, task_gold(cfg, art))

    def step(prompts: Batch, i: int) -> dict:
        m = cgpo_step(run, prompts, i)
        m.pop("_weights", None)
        return m

    return prompt_step_loop(
        cfg, out, tok, data, total, run.optim, step, lambda prompts: evaluate_cgpo(run, prompts), "cgpo/reward_mean"
    )
