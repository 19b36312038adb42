"""Online RL: PPO, GRPO, Dr. GRPO, DAPO, RLOO, ReMax, REINFORCE++, Safe RLHF (PPO-Lagrangian) and GSPO in one loop.

The controller is :func:`rl_step`; it reads like the papers' algorithm box (HybridFlow's "single controller")::

    prompts  = next prompts_per_step prompts
    batch    = rollout.generate(prompts)                  n samples each, with the sampler's log-probs
    batch   += reward.score(batch)  (+ cost.score)        R(x, y) per row (+ DAPO overlong penalty)
               DAPO: drop groups with equal rewards, generate more, until the batch is full
    batch   += rollout.generate(prompts, greedy)          ReMax only: R(x, ȳ) as the baseline
    scores   = shaping(scores, r_ref)                     reward.shaping (PAR): against reference answers
    batch    = filter(batch)                              PF-PPO: algo.sample_filter keeps reliable samples
    batch   += ref.logprobs(batch)                        skipped when the KL coefficient is 0
    batch   += actor.logprobs(batch)                      lp_old and truncated IS weights, unless reused (below)
    batch   += critic.values(batch)                       PPO / Safe RLHF only
    batch   += advantages(batch)                          pure function picked by name (rl_algos.py)
    for epoch in ppo_epochs: for mini-batch in shuffled batch:
        actor.update(mini-batch); critic.update(mini-batch)
    β ← kl_controller(KL);  λ ← lagrange(costs)            adaptive KL, Safe RLHF multiplier

Which estimator, loss, aggregation and KL placement each ``algo.name`` uses is the table in ``rl_algos.py``;
the controller branches only on that table's fields, never on the name.

Departures from the papers, on purpose:
* Old log-probs ``lp_old`` follow ``algo.old_logprobs``. With ``auto`` (the default) and one update per rollout
  batch (``ppo_epochs`` 1 and ``train.batch_size`` >= the rollout batch) the built-in sampler's log-probs are
  reused and the actor's extra forward pass is skipped: at θ = θ_old the ratio is 1 and its gradient does not
  depend on which copy is used (:func:`reuse_sampling_logprobs`; ``sampling`` always reuses). Otherwise
  (``recompute``, several epochs or mini-batches, or the vLLM backend) the trainer recomputes them, the PPO ratio
  uses them, and with ``algo.is_correction=tis`` each token's loss is weighted by the truncated importance weight
  ``min(exp(lp_old − lp_sampling), C)`` (C = ``algo.is_cap``; verl's TIS) so that a sampler that differs
  numerically from the trainer (kernels, precision, a stale copy) is corrected. With the built-in engine the
  weights are ~1.
* DAPO's dynamic sampling generates whole new batches of ``prompts_per_step`` prompts (at most
  ``dapo.max_sample_rounds`` rounds) and keeps the first full groups; a step still short trains on what it has
  and logs ``rollout/kept_groups``. Groups are filtered on the final reward (rule reward + overlong penalty).
* ReMax's baseline is the greedy response's reward R(x, ȳ) without a KL term (the paper's; the sampled response's
  return includes the KL penalty when ``kl.placement=reward``).
* Safe RLHF: the multiplier is updated after the policy update of the step, with that step's episode costs.

Run it:  ``alignflow rl --config configs/grpo.yaml``  (see ``docs/ppo.md``, ``docs/grpo.md`` ... for each preset).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch

from alignflow.algorithms.core import masked_mean
from alignflow.algorithms.dapo import dynamic_sampling_filter, overlong_penalty
from alignflow.algorithms.kl import sequence_kl
from alignflow.batch import ROW_METRIC, Batch, cat_rollouts
from alignflow.config import RLConfig
from alignflow.data.pipeline import prepare_data
from alignflow.rewards import RunningNorm
from alignflow.trainers import loop, multiturn_rl, rl_async
from alignflow.trainers.rl_algos import (
    AdvContext,
    Resolved,
    advantage_metrics,
    compute_advantages,
    kl_controller,
    resolve,
    truncated_is_weights,
)
from alignflow.trainers.rl_filter import filter_rollouts
from alignflow.trainers.rl_pairwise import greedy_anchors
from alignflow.trainers.rl_par import ReferenceScores, shape_with_references
from alignflow.trainers.rl_safety import make_lagrange, safety_gate, safety_rows
from alignflow.trainers.rl_setup import PromptStream, Roles, build_roles, needed_roles, prompt_batch
from alignflow.trainers.setup import resolve_builtin, start_run, task_gold

log = logging.getLogger("alignflow.rl")


@dataclasses.dataclass
class RLState:
    """Everything besides model/optimiser weights that a resumed run must restore."""

    prompts: PromptStream
    kl: object  # Fixed/AdaptiveKLController
    lagrange: object = None  # LagrangeMultiplier (Safe RLHF)
    reward_norm: object = None  # RunningNorm
    step: int = 0
    gold: object = None  # the built-in task's gold reward (PF-PPO's reliability metrics), not checkpointed
    refs: object = None  # rl_par.ReferenceScores (reward.shaping), a cache rebuilt after a resume
    pipeline: object = None  # rl_async.AsyncRollouts (rollout.async_steps > 0): batches queued for later steps
    reward: object = None  # the reward role: its sources' state across steps (the QDHF archive) is checkpointed

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            # prompts queued for later steps by async rollouts are given back (a resumed run samples them anew)
            "prompt_position": self.prompts.position - (self.pipeline.pending_rows if self.pipeline else 0),
            "kl": self.kl.state_dict(),
            "lagrange": self.lagrange.state_dict() if self.lagrange else None,
            "reward_norm": self.reward_norm.state_dict() if self.reward_norm else None,
            "reward_sources": self.reward.sources_state() if self.reward is not None else None,
        }

    def load_state_dict(self, s: dict) -> None:
        self.step, self.prompts.position = int(s["step"]), int(s["prompt_position"])
        self.kl.load_state_dict(s["kl"])
        if self.lagrange and s.get("lagrange"):
            self.lagrange.load_state_dict(s["lagrange"])
        if self.reward_norm and s.get("reward_norm"):
            self.reward_norm.load_state_dict(s["reward_norm"])
        if self.reward is not None and s.get("reward_sources"):
            self.reward.load_sources_state(s["reward_sources"])


@dataclasses.dataclass
class RLResult:
    model: torch.nn.Module
    tokenizer: object
    history: list = dataclasses.field(default_factory=list)  # one metrics dict per RL step
    eval: dict = dataclasses.field(default_factory=dict)
    evals: list = dataclasses.field(default_factory=list)  # (step, eval metrics) at 0, every eval_every, the end
    output_dir: Path = Path(".")
    roles: Roles = None


# ----------------------------------------------------------------------------------------------- rollouts
class _Tally:
    """Sums over every sampled row of a step (kept or filtered), for the rollout/* metrics; and the counts of rows
    whose reward (cost) failed and was scored with reward.error_score (reward/errors, reward/timeouts, ...)."""

    def __init__(self):
        self.rows, self.sums, self.counts = 0, {}, {}

    def add(self, batch: Batch) -> None:
        self.rows += len(batch)
        cols = {
            "rollout/response_len": batch["response_mask"].sum(-1).float(),
            "rollout/truncated_frac": torch.tensor([float(r == "length") for r in batch["finish_reason"]]),
        }
        for key in [k for k in batch.tensors if k.startswith(("scores/", "costs/"))]:
            kind = "reward" if key.startswith("scores/") else "cost"
            cols[f"rollout/{kind}_{key.split('/', 1)[1]}_mean"] = batch[key]
        cols["rollout/reward_mean"] = batch["scores"]
        for key in [k for k in batch.tensors if k.startswith(ROW_METRIC)]:  # LATR's group stats, a source's measures
            cols["rollout/" + key.removeprefix(ROW_METRIC)] = batch[key]
        if "costs" in batch:
            cols["rollout/cost_mean"] = batch["costs"]
        for k, v in cols.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.float().sum())
        for key in [k for k in batch.tensors if k.startswith(("scores_failures/", "costs_failures/"))]:
            name = ("reward/" if key.startswith("scores") else "cost/") + key.split("/", 1)[1]
            self.counts[name] = self.counts.get(name, 0.0) + float(batch[key].sum())

    def metrics(self) -> dict:
        return {k: v / max(self.rows, 1) for k, v in self.sums.items()} | self.counts


def sample_and_score(roles: Roles, prompts: Batch, cfg: RLConfig) -> tuple[Batch, float]:
    """rollout.generate -> reward.score (-> cost.score) -> DAPO overlong penalty. Returns (batch, generation s)."""
    t0 = time.perf_counter()
    batch = roles.rollout.generate(prompts)
    if cfg.reward.pairwise.anchor == "greedy":  # pairwise RLHF: the policy's greedy response as the anchor
        batch = batch.union(greedy_anchors(roles.rollout, prompts, batch))
    gen_s = time.perf_counter() - t0
    batch = batch.union(roles.reward.score(batch))
    if roles.cost is not None:
        batch = batch.union(roles.cost.score(batch))
    return batch, gen_s


def collect_rollouts(roles: Roles, st: RLState, cfg: RLConfig, tally: _Tally) -> tuple[Batch | None, dict]:
    """One step's training batch: prompts_per_step full groups (DAPO: refilled until every group is informative)."""
    want, n = cfg.rollout.prompts_per_step, cfg.rollout.n
    rounds = cfg.dapo.max_sample_rounds if cfg.dapo.dynamic_sampling else 1
    kept, groups, gen_s = [], 0, 0.0
    waits: dict = {}
    if cfg.rollout.latr.enabled:  # the tree share of LATR decays over the RL steps
        roles.rollout.set_step(st.step)
    for r in range(rounds):  # noqa: B007 - r (rounds used) is read after the loop
        if st.pipeline is not None and r == 0:  # async: queued steps ago, sampled from an older version
            batch, secs, waits = st.pipeline.take(st.step)
        else:
            batch, secs = sample_and_score(roles, st.prompts.take(want), cfg)
            if st.pipeline is not None:  # a refill round: the current weights (colocated rollout)
                batch[rl_async.VERSION] = torch.full((len(batch),), st.step, dtype=torch.long)
        gen_s += secs
        tally.add(batch)
        if cfg.dapo.overlong_penalty:
            L = cfg.rollout.max_new_tokens
            pen = overlong_penalty(batch["response_mask"].sum(-1), L, cfg.dapo.overlong_cache_len or max(1, L // 4))
            batch["scores"] = batch["scores"] + pen.to(batch["scores"].device)
            tally.sums["rollout/overlong_penalty_mean"] = tally.sums.get("rollout/overlong_penalty_mean", 0.0) + float(
                pen.sum()
            )
        if cfg.dapo.dynamic_sampling:
            batch = batch.select(dynamic_sampling_filter(batch["scores"], n))
        kept.append(batch)
        groups += len(batch) // n
        if groups >= want:
            break
    m = {"perf/gen_s": gen_s, "rollout/sample_rounds": float(r + 1)} | waits
    if cfg.dapo.dynamic_sampling:
        m["rollout/kept_groups"] = float(min(groups, want))
        if groups < want:
            log.warning(
                "step %d: dynamic sampling found %d of %d informative groups in %d rounds; training on those",
                st.step,
                groups,
                want,
                rounds,
            )
    kept = [b for b in kept if len(b)]
    if not kept:
        return None, m
    batch = cat_rollouts(kept)
    return batch.select(list(range(min(len(batch), want * n)))), m


def shape_rewards(batch: Batch, st: RLState, cfg: RLConfig) -> None:
    """Running normalisation and clipping of the training batch's scores (PPO-max), in place. ReMax's greedy
    baseline goes through the same transform (statistics updated with the sampled scores only)."""
    centre = cfg.reward.normalize == "running"
    for i, key in enumerate(k for k in ("scores", "greedy_scores") if k in batch):
        scores = batch[key]
        if st.reward_norm is not None:
            scores = st.reward_norm.normalize(scores, subtract_mean=centre, update=i == 0).float()
        if cfg.reward.clip > 0:
            scores = scores.clamp(-cfg.reward.clip, cfg.reward.clip)
        batch[key] = scores


def greedy_baseline(roles: Roles, batch: Batch, cfg: RLConfig) -> tuple[Batch, float]:
    """ReMax: one greedy response per prompt, scored; its reward R(x, ȳ) for every sample of the prompt."""
    n = cfg.rollout.n
    first = batch.select(list(range(0, len(batch), n)))  # one row per prompt (groups are contiguous)
    ids, mask = first["prompt_ids"], first["prompt_mask"]
    skip = {"response", "finish_reason", "prompt_index"}
    meta = {k: v for k, v in first.meta.items() if k not in skip}
    meta["prompt_token_ids"] = [i[m.bool()].tolist() for i, m in zip(ids, mask, strict=False)]
    t0 = time.perf_counter()
    greedy = roles.rollout.generate(Batch(meta=meta), greedy=True)
    secs = time.perf_counter() - t0
    scores = roles.reward.score(greedy)["scores"]  # (P,)
    return Batch({"greedy_scores": scores.repeat_interleave(n)}), secs  # (P * n,)


# ----------------------------------------------------------------------------------------------- the step
def reuse_sampling_logprobs(cfg: RLConfig, rows: int) -> bool:
    """``algo.old_logprobs``: skip the actor's extra forward pass and use the sampler's log-probs as lp_old?

    With one update per rollout batch the PPO ratio exp(lp_θ − lp_old) is evaluated at θ = θ_old only, so its
    value is 1 and its gradient is ∇lp_θ whichever numerically-equal copy of lp_old is used (TRL's GRPO does the
    same with num_iterations=1). The built-in engine reads the actor's live weights and its log-probs equal the
    trainer's to float rounding (tests/test_rollout.py), so the truncated IS correction is skipped then (weights
    1). A sampler with different numerics (another backend, lower precision) should use ``recompute``.
    """
    mode = cfg.algo.old_logprobs
    if cfg.rollout.backend != "builtin":  # vLLM samples with its own kernels in bf16 (``sampling`` is refused by
        return False  # rl_algos.resolve): never reuse its log-probs
    if mode == "auto":  # async rollouts: stale samples, so lp_old is recomputed and TIS corrects them
        return cfg.algo.ppo_epochs == 1 and cfg.train.batch_size >= rows and not cfg.rollout.async_steps
    return mode == "sampling"


def prepare(roles: Roles, batch: Batch, st: RLState, cfg: RLConfig, algo: Resolved) -> Batch:
    """Reference and old log-probs, TIS weights, values and advantages of a scored batch."""
    beta = st.kl.value
    reuse = reuse_sampling_logprobs(cfg, len(batch))
    # four independent reads of the same batch: started together, so roles on separate workers (split placement)
    # compute at the same time; in one process each call simply runs in turn
    calls = [
        roles.ref.submit("logprobs", batch) if beta > 0 else None,
        None if reuse else roles.actor.submit("logprobs", batch),
        roles.critic.submit("values", batch) if roles.critic is not None else None,
        roles.cost_critic.submit("values", batch) if roles.cost_critic is not None else None,
    ]
    for call in calls:
        if call is not None:
            batch = batch.union(call.result())
    if reuse:
        batch["old_logprobs"] = batch["sampling_logprobs"]  # the actor then measures the entropy in its update
    if cfg.algo.is_correction == "tis" and not reuse:
        batch["is_weights"] = truncated_is_weights(
            batch["old_logprobs"], batch["sampling_logprobs"], batch["response_mask"], cfg.algo.is_cap
        )
    ctx = AdvContext(
        beta=beta if algo.kl_placement == "reward" else 0.0,
        estimator=algo.kl_estimator,
        gamma=cfg.algo.gamma,
        lam=cfg.algo.lam,
        whiten=cfg.algo.whiten_advantages,
        reinforce_pp_baseline=cfg.algo.reinforce_pp_baseline,
        lagrange=st.lagrange.value if st.lagrange else 0.0,
        token_clip=cfg.cost.token_clip or None,
        pairwise_center=cfg.reward.pairwise.center,
        pairwise_normalize=cfg.reward.pairwise.normalize,
        macro=cfg.algo.macro,
        tokenizer=roles.tokenizer,
        seed=cfg.train.seed * 1_000_003 + st.step,
    )
    return batch.union(compute_advantages(batch, algo, ctx, cfg.algo.advantage_clip))


def update(roles: Roles, batch: Batch, st: RLState, cfg: RLConfig) -> dict:
    """``ppo_epochs`` passes over shuffled mini-batches of ``train.batch_size`` rows; metrics averaged."""
    sums: dict = {}
    count = 0
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + st.step)
    for epoch in range(cfg.algo.ppo_epochs):
        order = torch.randperm(len(batch), generator=gen)
        for i, mb in enumerate(batch.select(order).split(cfg.train.batch_size)):
            label = f"{st.step} (epoch {epoch}, mini-batch {i})"
            roles.actor.set_kl_coef(st.kl.value, label)
            # PPO-max critic pre-training: the first critic.pretrain_steps steps leave the policy frozen
            m = roles.actor.update(mb) if st.step >= cfg.critic.pretrain_steps else {"critic/pretraining": 1.0}
            for critic in (roles.critic, roles.cost_critic):
                if critic is not None:
                    critic.set_label(label)
                    m |= critic.update(mb)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    return {k: v / count for k, v in sums.items()}


def after_update(batch: Batch, st: RLState, entropy: float | None = None) -> dict:
    """KL controller and Lagrange multiplier updates with this step's batch (``entropy``: the step's mean token
    entropy, for an entropy-gated controller)."""
    out = {"policy/kl_coef": st.kl.value}
    if "ref_logprobs" in batch:
        kl = float(sequence_kl(batch["old_logprobs"], batch["ref_logprobs"], batch["response_mask"], "k1"))
        st.kl.update(kl, len(batch), entropy=entropy)
        out["policy/kl"] = kl
    if st.lagrange is not None:
        out["safe/lambda"] = st.lagrange.update(batch["costs"])
    return out


def rl_step(roles: Roles, st: RLState, cfg: RLConfig, algo: Resolved) -> dict:
    """One RL step (the algorithm box of the module docstring); returns its metrics."""
    t0 = time.perf_counter()
    tally = _Tally()
    batch, m = ROLLOUT_SOURCES[multiturn_rl.mode(cfg)](roles, st, cfg, tally)
    m |= tally.metrics()
    if batch is None:
        return m | {"train/skipped_step": 1.0}
    m |= rl_async.staleness_metrics(batch, st.step)
    if algo.greedy_baseline:
        greedy, secs = greedy_baseline(roles, batch, cfg)
        batch, m["perf/gen_s"] = batch.union(greedy), m["perf/gen_s"] + secs
        m["rollout/greedy_reward_mean"] = float(greedy["greedy_scores"].mean())
    if st.refs is not None:
        m |= shape_with_references(roles, batch, cfg, st.refs)
    batch, filtered = filter_rollouts(
        batch, algo.sample_filter, cfg.algo.filter_range, cfg.train.seed, st.step, st.gold
    )
    m |= filtered
    shape_rewards(batch, st, cfg)
    batch = prepare(roles, batch, st, cfg, algo)
    m |= update(roles, batch, st, cfg)
    m |= advantage_metrics(batch) | batch_metrics(batch)
    m |= after_update(batch, st, m.get("policy/entropy"))
    step_s = time.perf_counter() - t0
    m |= {
        "perf/step_s": step_s,
        "perf/tokens_per_s": float(batch["attention_mask"].sum()) / step_s,
        "perf/gen_share": m["perf/gen_s"] / step_s,
    }
    return m


def batch_metrics(batch: Batch) -> dict:
    mask = batch["response_mask"]
    out = {"policy/entropy": float(masked_mean(batch["entropy"], mask))} if "entropy" in batch else {}
    if "is_weights" in batch:
        out["rollout/is_weight_mean"] = float(masked_mean(batch["is_weights"], mask))
        out["rollout/logprob_abs_diff"] = float(
            masked_mean((batch["old_logprobs"] - batch["sampling_logprobs"]).abs(), mask)
        )
    return out


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(roles: Roles, prompts: Batch, gold=None, chunk: int = 64) -> dict:
    """Greedy responses to held-out prompts: ``eval/reward_mean`` (the training reward), per-source means,
    ``eval/response_len`` and, for built-in tasks, ``eval/gold_reward``."""
    if not len(prompts):
        return {}
    parts = []
    for piece in prompts.split(chunk):
        out = roles.rollout.generate(piece, greedy=True)
        parts.append(out.union(roles.reward.score(out)))
    batch = cat_rollouts(parts)
    m = {
        "eval/reward_mean": float(batch["scores"].mean()),
        "eval/response_len": float(batch["response_mask"].sum(-1).float().mean()),
    }
    for key in [k for k in batch.tensors if k.startswith("scores/")]:
        m[f"eval/reward_{key.split('/', 1)[1]}_mean"] = float(batch[key].mean())
    if gold is not None:
        m["eval/gold_reward"] = sum(gold(batch["prompt"], batch["response"])) / len(batch)
    return m


# rollout source and evaluation per mode: single-turn generation, or multi-turn episodes (env.*, multiturn_rl.py)
ROLLOUT_SOURCES = {"single": collect_rollouts, "episodes": multiturn_rl.collect_episodes}
EVALUATIONS = {
    "single": lambda roles, prompts, gold, cfg: evaluate(roles, prompts, gold),
    "episodes": multiturn_rl.evaluate_episodes,
}
# what the asynchronous rollout thread runs per queued batch (rl_async.py): (roles, prompts, cfg, step) -> (batch, s)
ASYNC_SOURCES = {
    "single": lambda roles, prompts, cfg, step: sample_and_score(roles, prompts, cfg),
    "episodes": multiturn_rl.produce_episodes,
}


# ----------------------------------------------------------------------------------------------- checkpoints
def save_all(roles: Roles, st: RLState, out: Path) -> None:
    """Critics first, then the actor with the run state: the actor's ``step-N`` is what resume looks for, so a
    crash in between leaves the previous complete checkpoint in charge."""
    root = out / "checkpoints"
    for name, critic in (("critic", roles.critic), ("cost_critic", roles.cost_critic)):
        if critic is not None:
            critic.save(root / f"{name}-{st.step}")
    roles.actor.save(root / f"step-{st.step}", st.state_dict())


def resume(roles: Roles, st: RLState, out: Path, enabled: bool = True) -> int:
    """Restore the newest checkpoint's critics, actor and loop state through :func:`loop.resume`; the step."""

    def load(ckpt: Path) -> dict:
        n = ckpt.name.split("-", 1)[1]
        for name, critic in (("critic", roles.critic), ("cost_critic", roles.cost_critic)):
            if critic is not None:
                critic.load(out / "checkpoints" / f"{name}-{n}")
        st.load_state_dict(roles.actor.load(ckpt))  # last: its RNG state wins
        return {"step": st.step}

    return int(loop.resume(out, enabled, load).get("step", 0))


# ----------------------------------------------------------------------------------------------- entry point
def _sizes(cfg: RLConfig, num_prompts: int) -> tuple[int, int]:
    """(RL steps, optimiser steps of the actor) for the scheduler."""
    steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * num_prompts / cfg.rollout.prompts_per_step))
    rows = cfg.rollout.prompts_per_step * cfg.rollout.n
    return steps, steps * cfg.algo.ppo_epochs * math.ceil(rows / cfg.train.batch_size)


def _state(cfg: RLConfig, algo: Resolved, rows: list) -> RLState:
    kl = kl_controller(cfg)
    lagrange = make_lagrange(cfg) if algo.cost else None  # Safe RLHF (HC-RLHF: held to the pessimistic bound)
    norm = RunningNorm() if cfg.reward.normalize != "none" else None
    refs = ReferenceScores(cfg.reward.reference_greedy) if cfg.reward.shaping != "none" else None
    return RLState(PromptStream(rows, cfg.train.seed), kl, lagrange, norm, refs=refs)


def recover(
    roles: Roles,
    st: RLState,
    cfg: RLConfig,
    algo: Resolved,
    rows: list,
    out: Path,
    err: Exception,
    logger,
    restarts: int,
) -> int:
    """A worker died: recreate the worker sets, reload the last checkpoint (or start over without one) and log
    the event. Returns the step to go on from. Only Ray placements recover; the error is re-raised otherwise,
    and after ``resources.max_restarts`` restarts."""
    if roles.placement is None or restarts >= cfg.resources.max_restarts:
        raise err
    log.warning(
        "step %d: %s; restarting the workers (restart %d of at most %d)",
        st.step,
        err,
        restarts + 1,
        cfg.resources.max_restarts,
    )
    failed_at = st.step
    roles.placement.restart()
    if st.pipeline is not None:  # async rollouts: the queued batches go; queueing restarts at the resumed step
        st.pipeline.reset()
    fresh = _state(cfg, algo, rows)
    st.prompts, st.kl, st.lagrange, st.reward_norm, st.step = (
        fresh.prompts,
        fresh.kl,
        fresh.lagrange,
        fresh.reward_norm,
        0,
    )
    step = resume(roles, st, out)
    logger.rewind(step)  # the steps after the checkpoint are done again
    logger.log(
        step,
        {
            "event/worker_lost": str(err).splitlines()[0],
            "event/failed_at_step": failed_at,
            "event/resumed_from_step": step,
        },
    )
    return step


def train_rl(cfg: RLConfig) -> RLResult:
    """Run online RL as configured (``alignflow rl``); returns the policy, per-step metrics and the final eval.

    With roles on Ray workers (``resources``) a dead worker is survived: the workers are recreated and the run
    goes on from the last checkpoint (:func:`recover`); ``RLResult.model`` is then None and the trained model is
    the Hugging Face directory ``<output_dir>/model``.
    """
    from alignflow.distributed.placement import check_placement
    from alignflow.distributed.ray_group import WorkerLost

    check_placement(cfg, needed_roles(cfg, resolve(cfg)))  # a too small Ray cluster fails before any work
    multiturn_rl.check(cfg)
    rl_async.check(cfg)
    art = resolve_builtin(cfg, "rl")
    if art is not None and not cfg.data.eval_path:
        cfg.data.eval_path = str(art.eval_prompts_path)
    algo = resolve(cfg)
    out, device, tok = start_run(cfg)
    data = prepare_data(cfg.data, tok, expect=("prompt",), seed=cfg.train.seed)
    total, opt_steps = _sizes(cfg, len(data.train))
    roles = build_roles(cfg, algo, device, opt_steps, tok)
    pipeline = rl_async.start(roles, cfg, ASYNC_SOURCES[multiturn_rl.mode(cfg)])  # None unless async_steps > 0
    try:
        return _run(cfg, algo, roles, data, total, out, tok, art, WorkerLost, pipeline)
    finally:
        if pipeline is not None:
            pipeline.close()
        if roles.placement is not None:
            roles.placement.shutdown()


def _run(
    cfg: RLConfig, algo: Resolved, roles: Roles, data, total: int, out: Path, tok, art, lost, pipeline=None
) -> RLResult:
    """The step loop of :func:`train_rl`: resume, evaluate, step, log, save; recover from a lost worker."""
    st = _state(cfg, algo, data.train)
    st.pipeline, st.reward = pipeline, roles.reward
    start = resume(roles, st, out, cfg.train.resume)
    held_out = data.eval[: cfg.rollout.eval_prompts]
    eval_prompts = prompt_batch(held_out, [10**9 + i for i in range(len(held_out))], st.prompts.fields)
    gold = st.gold = task_gold(cfg, art)
    safety = safety_rows(cfg, data.eval)  # HC-RLHF's held-out safety set ([] without a test)
    logger = loop.MetricsLogger(out, start=start)
    for r in data.reports:
        logger.log(start, {"data/report": r})
    bar = loop.Progress(total, start, cfg.train.progress, f"rl/{cfg.algo.name}")
    result = RLResult(roles.actor.model if roles.placement is None else None, tok, output_dir=out, roles=roles)

    def run_eval(step: int) -> dict:
        m = EVALUATIONS[multiturn_rl.mode(cfg)](roles, eval_prompts, gold, cfg)
        logger.log(step, m)
        result.evals.append((step, m))
        return m

    if cfg.train.eval_every and start == 0:
        run_eval(0)  # the starting policy, so every curve has its baseline
    step, restarts = start, 0
    while step < total:
        try:
            st.step = step
            if st.pipeline is not None:  # between updates: queue step + async_steps with this version's weights
                rl_async.schedule(st.pipeline, roles, st, cfg, total)
            m = rl_step(roles, st, cfg, algo)
            st.step = step + 1
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < total:
                run_eval(step + 1)
            loop.checkpoint_step(step + 1, total, cfg.train, out, lambda _: save_all(roles, st, out))
        except lost as err:
            step = recover(roles, st, cfg, algo, data.train, out, err, logger, restarts)
            restarts += 1
            del result.history[max(step - start, 0) :]  # the steps after the checkpoint are done again
            result.evals = [(s, e) for s, e in result.evals if s <= step]
            continue
        result.history.append(m)
        bar.update(
            int(m.get("perf/tokens_per_s", 0) * m.get("perf/step_s", 0)),
            reward=m.get("rollout/reward_mean", float("nan")),
        )
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total:
            logger.log(step + 1, m)
        step += 1
    bar.close()
    result.eval = run_eval(total)
    if safety:  # HC-RLHF: the final policy is saved only when the held-out safety test passes
        prompts = prompt_batch(safety, [2 * 10**9 + i for i in range(len(safety))], st.prompts.fields)
        result.eval |= safety_gate(roles, prompts, cfg, out)
        logger.log(total, {k: v for k, v in result.eval.items() if k.startswith("safety/")})
    logger.close()
    if result.eval.get("safety/passed", 1.0):
        roles.actor.export(out / "model", tok)
    return result
