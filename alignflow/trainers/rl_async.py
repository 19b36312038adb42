"""Asynchronous (k-step-off) rollouts for ``alignflow rl``: ``rollout.async_steps`` = k (docs/async.md).

The version contract. The policy's *version* is the number of RL steps (policy updates) done: the weights at the
start of step t are version t. With ``async_steps`` = k the rollout batch that step t trains on was sampled from
version ``max(0, t - k)``, i.e. the weights after step ``t - k - 1`` (the initial weights for t <= k). Its
staleness ``t - max(0, t - k) = min(t, k)`` never exceeds k. Each row carries its ``policy_version``.

How, in one process: a second copy of the policy (the *rollout copy*) lives with one background thread that
generates (and scores) batches in order. At the start of step t, between two updates, the controller takes a
snapshot of the actor's weights (version t) and queues the batch of step t + k with it; the thread copies the
snapshot into the rollout copy just before generating that batch, so it never reads weights that are being
updated. Step t then waits for its own batch (queued k steps earlier) and trains while the thread works on
the next ones; generation spends its time in torch ops that release the GIL, so the two overlap.

Memory: the rollout copy (one more set of policy weights) plus a snapshot per queued batch, at most k + 1 sets.

Determinism: prompts are taken from the prompt stream by the controller in step order, the sampling noise is
keyed per prompt row (``Rollout.generate``), and the thread's jobs run one at a time in queue order, so the
same seed gives the same batches whatever the timing.

The group API: the job talks to the rollout copy only through a weight loader and the rollout role's
``generate``: in one process a :class:`~alignflow.distributed.groups.LocalGroup` over the copy; with Ray worker
sets (``resources``) a worker set of its own, ``async_rollout`` (``rollout.async_workers`` workers, each an unsharded
copy of the policy with the actor's ``cpus/gpus_per_worker``). There the snapshot is the actor set's consolidated
state dict (``actor.state_dict``, the collective every checkpoint uses), taken in the controller between updates,
and the job pushes it to every rollout worker (``load_weights``) before generating: the rollout of step t + k runs
on the rollout set while the actor set trains step t. The version contract, the staleness metrics and the
importance correction are the controller's, so they are the same in both placements.

Multi-turn episodes (``env.*``) use the same pipeline: the job runs the step's episodes on the rollout copy
(:func:`alignflow.trainers.multiturn_rl.produce_episodes`) instead of one generation.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig
from alignflow.distributed.groups import LocalGroup, dispatch
from alignflow.distributed.placement import roles_on_workers, set_plan, start_set, worker_device
from alignflow.distributed.ray_group import check_resources, init_ray, maybe_ray
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.trainers.roles import Rollout

VERSION = "policy_version"  # (B,) int64: the policy version each row was sampled from


def check(cfg: RLConfig) -> None:
    """Refuse, before any work, what asynchronous rollouts do not support yet (one line naming the key)."""
    if cfg.rollout.async_steps == 0:
        return
    if cfg.rollout.backend != "builtin":
        raise ConfigError(
            f"rollout.async_steps={cfg.rollout.async_steps} needs rollout.backend: builtin (asynchronous vLLM "
            "rollouts are not built; use rollout.backend=builtin or rollout.async_steps=0)"
        )
    if maybe_ray(cfg.resources):  # the actor's sets and the rollout set must fit together, before any work
        res, n = cfg.resources.actor, cfg.rollout.async_workers
        names = ("actor", "rollout")  # the actor's set, as rl_setup lays it out (other sets are checked there)
        plan = set_plan(cfg, roles_on_workers(cfg, names))
        init_ray(cfg.ray.address, cfg.ray.namespace, cfg.ray.num_cpus)
        check_resources(
            [(s, w, r.cpus_per_worker, r.gpus_per_worker) for s, (r, w) in plan.items()]
            + [("async_rollout", n, res.cpus_per_worker, res.gpus_per_worker)]
        )


def start(roles, cfg: RLConfig, produce: Callable) -> AsyncRollouts | None:
    """The pipeline of a run (None when ``rollout.async_steps`` is 0): a rollout copy of the policy with its own
    :class:`~alignflow.trainers.roles.Rollout` -- in this process, or a Ray worker set when the roles run on Ray
    -- and a thread that runs ``produce(roles, prompts, cfg, step)`` with it (the reward and cost roles are shared
    with the controller; ``step`` is the RL step the batch is for)."""
    k = cfg.rollout.async_steps
    if not k:
        return None
    if roles.placement is not None:
        ws = start_set(cfg, "async_rollout", cfg.resources.actor, cfg.rollout.async_workers, build_rollout_copy, (cfg,))
        roles.placement.sets["async_rollout"] = ws  # restarted and shut down with the run's other worker sets
        group = ws.group("rollout")
        side = dataclasses.replace(roles, rollout=group)
        return AsyncRollouts(group.load_weights, lambda prompts, step: produce(side, prompts, cfg, step), k)
    r = roles.rollout
    twin = rollout_copy(roles.actor.model)
    side = dataclasses.replace(roles, rollout=LocalGroup(Rollout(twin, r.tokenizer, r.cfg, r.device, r.mp, r.seed)))
    return AsyncRollouts(twin, lambda prompts, step: produce(side, prompts, cfg, step), k)


def schedule(pipeline: AsyncRollouts, roles, st, cfg: RLConfig, total: int) -> None:
    """At the start of step ``st.step``: queue the batches up to step + k with a snapshot of the actor (on Ray:
    the actor set's consolidated state dict, a collective of that set, taken here between two updates)."""
    weights = roles.actor.state_dict if roles.placement is not None else lambda: snapshot(roles.actor.model)
    pipeline.schedule(st.step, total, weights, lambda: st.prompts.take(cfg.rollout.prompts_per_step))


class RolloutCopy(Rollout):
    """A rollout role over its own unsharded copy of the policy, which receives the actor's weights through
    :meth:`load_weights` (the role of the ``async_rollout`` Ray worker set)."""

    @dispatch("all")
    def load_weights(self, state: dict) -> None:
        with torch.no_grad():
            self.model.load_state_dict(state)


def build_rollout_copy(cfg: RLConfig) -> dict:
    """Runs INSIDE each worker of the ``async_rollout`` set: the policy loaded unsharded and frozen (its weights
    are overwritten by the first pushed snapshot), as a :class:`RolloutCopy`."""
    device = worker_device()
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    model_cfg = dataclasses.replace(cfg.model, gradient_checkpointing=False)
    twin = rollout_copy(load_causal_lm(model_cfg, device))
    return {"rollout": RolloutCopy(twin, tok, cfg.rollout, device, cfg.train.mixed_precision, cfg.train.seed)}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer: the weights of one policy version."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def rollout_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of the policy for the rollout thread (no gradients, eval mode)."""
    twin = copy.deepcopy(model)
    twin.requires_grad_(False)
    twin.eval()
    return twin


@dataclasses.dataclass
class Job:
    step: int  # the RL step that trains on this batch
    version: int  # the policy version it samples from
    rows: int  # prompt rows it took from the stream
    queued: float  # perf_counter when queued
    future: Future


class AsyncRollouts:
    """The rollout pipeline: ``schedule`` at the start of each step, ``take`` that step's batch.

    load: the rollout copy (a module, whose ``load_state_dict`` receives the snapshots) or a function that pushes
    a snapshot to it (a Ray rollout set's ``load_weights``); produce(prompts, step) -> (batch, generation seconds)
    runs in the thread (generate and score with roles over the rollout copy; ``step``: the RL step the batch is
    for). k: ``rollout.async_steps``.
    """

    def __init__(self, load: torch.nn.Module | Callable[[dict], object], produce: Callable, k: int):
        if k < 1:
            raise ValueError(f"AsyncRollouts: k must be >= 1, got {k}")
        self.load = load.load_state_dict if isinstance(load, torch.nn.Module) else load
        self.produce, self.k = produce, k
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignflow-rollout")
        self.jobs: collections.deque[Job] = collections.deque()
        self.next_step = None  # the next step to queue a batch for
        self.last_end = None  # when the thread finished its previous job

    @property
    def pending_rows(self) -> int:
        """Prompt rows taken from the stream for batches not yet trained on (a checkpoint gives them back)."""
        return sum(j.rows for j in self.jobs)

    def schedule(self, step: int, total: int, weights: Callable[[], dict], take: Callable[[], Batch]) -> None:
        """At the start of ``step`` (weights = version ``step``): queue the batches of steps up to ``step + k``
        (fewer near ``total``), each sampled from this version. ``weights()`` gives the snapshot, ``take()`` the
        next prompts; both run here, in the controller's thread, between updates."""
        if self.next_step is None:
            self.next_step = step
        last = min(step + self.k, total - 1)
        if self.next_step > last:
            return
        state = weights()
        while self.next_step <= last:
            prompts = take()
            fut = self.pool.submit(self._job, state, prompts, step, self.next_step)
            self.jobs.append(Job(self.next_step, step, len(prompts), time.perf_counter(), fut))
            self.next_step += 1

    def _job(self, state: dict, prompts: Batch, version: int, step: int) -> tuple[Batch, float, float, float]:
        """In the thread: push the snapshot into the rollout copy, generate and score. (batch, gen s, start, end)."""
        start = time.perf_counter()
        with torch.no_grad():
            self.load(state)
        batch, gen_s = self.produce(prompts, step)
        batch[VERSION] = torch.full((len(batch),), version, dtype=torch.long)
        return batch, gen_s, start, time.perf_counter()

    def take(self, step: int) -> tuple[Batch, float, dict]:
        """The batch queued for ``step``: (batch, generation seconds, metrics). ``perf/rollout_wait_s``: how
        long the trainer waited for it; ``perf/train_wait_s``: how long the rollout thread sat idle (waiting for
        the trainer to queue work) before starting it."""
        if not self.jobs or self.jobs[0].step != step:
            raise RuntimeError(
                f"async rollouts: no batch queued for step {step} (queued: {[j.step for j in self.jobs]})"
            )
        job = self.jobs.popleft()
        t0 = time.perf_counter()
        batch, gen_s, start, end = job.future.result()
        wait = time.perf_counter() - t0
        idle = 0.0 if self.last_end is None else max(0.0, start - self.last_end)  # jobs run one after another
        self.last_end = end
        return batch, gen_s, {"perf/rollout_wait_s": wait, "perf/train_wait_s": idle}

    def reset(self) -> None:
        """Drop the queued batches (after the running job ends, its error ignored) and start queueing afresh: a
        run that recovers from a lost worker resumes its checkpoint, whose prompt position excludes them."""
        for job in self.jobs:
            job.future.cancel()
        for job in self.jobs:
            if not job.future.cancelled():
                job.future.exception()  # waits; a job that failed with the dead worker is dropped with the rest
        self.jobs.clear()
        self.next_step = self.last_end = None

    def close(self) -> None:
        """Drop the queued batches and stop the thread (after the job it is running)."""
        for job in self.jobs:
            job.future.cancel()
        self.jobs.clear()
        self.pool.shutdown(wait=True)


def staleness_metrics(batch: Batch, step: int) -> dict:
    """``rollout/staleness_mean`` and ``_max`` (policy versions behind the trainer), ``rollout/policy_version_min``."""
    if VERSION not in batch.tensors:
        return {}
    v = batch[VERSION].float()
    return {
        "rollout/staleness_mean": float(step - v.mean()),
        "rollout/staleness_max": float(step - v.min()),
        "rollout/policy_version_min": float(v.min()),
    }
