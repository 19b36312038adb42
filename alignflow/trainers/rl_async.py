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

The group API: the job talks to the rollout copy only through ``load_weights`` / ``generate``-style calls on
the objects it is given (here :class:`~alignflow.distributed.groups.LocalGroup` roles). Ray worker sets are
refused for now (:func:`check`).
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
from alignflow.distributed.groups import LocalGroup
from alignflow.distributed.ray_group import maybe_ray
from alignflow.trainers.roles import Rollout

VERSION = "policy_version"  # (B,) int64: the policy version each row was sampled from


def check(cfg: RLConfig) -> None:
    """Refuse, before any work, what asynchronous rollouts do not support yet (one line naming the key)."""
    if cfg.rollout.async_steps == 0:
        return
    refused = [
        ("rollout.backend", cfg.rollout.backend != "builtin", "builtin"),
        ("env.task / env.path", bool(cfg.env.task or cfg.env.path), "unset (multi-turn episodes are synchronous)"),
        ("resources", maybe_ray(cfg.resources), "one process (resources.actor.workers=1, resources.backend=local)"),
    ]
    for key, bad, valid in refused:
        if bad:
            raise ConfigError(f"rollout.async_steps={cfg.rollout.async_steps} needs {key}: {valid}")


def start(roles, cfg: RLConfig, sample_and_score: Callable) -> AsyncRollouts | None:
    """The pipeline of a run (None when ``rollout.async_steps`` is 0): a rollout copy of the actor's module with
    its own :class:`~alignflow.trainers.roles.Rollout`, and a thread that runs ``sample_and_score`` with it (the
    reward and cost roles are shared with the controller)."""
    k = cfg.rollout.async_steps
    if not k:
        return None
    r = roles.rollout
    twin = rollout_copy(roles.actor.model)
    side = dataclasses.replace(roles, rollout=LocalGroup(Rollout(twin, r.tokenizer, r.cfg, r.device, r.mp, r.seed)))
    return AsyncRollouts(twin, lambda prompts: sample_and_score(side, prompts, cfg), k)


def schedule(pipeline: AsyncRollouts, roles, st, cfg: RLConfig, total: int) -> None:
    """At the start of step ``st.step``: queue the batches up to step + k with a snapshot of the actor."""
    pipeline.schedule(
        st.step,
        total,
        lambda: snapshot(roles.actor.model),
        lambda: st.prompts.take(cfg.rollout.prompts_per_step),
    )


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

    model: the rollout copy, which receives the snapshots; produce(prompts) -> (batch, generation seconds) runs
    in the thread (generate and score with roles over the rollout copy). k: ``rollout.async_steps``.
    """

    def __init__(self, model: torch.nn.Module, produce: Callable, k: int):
        if k < 1:
            raise ValueError(f"AsyncRollouts: k must be >= 1, got {k}")
        self.model, self.produce, self.k = model, produce, k
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
            fut = self.pool.submit(self._job, state, prompts, step)
            self.jobs.append(Job(self.next_step, step, len(prompts), time.perf_counter(), fut))
            self.next_step += 1

    def _job(self, state: dict, prompts: Batch, version: int) -> tuple[Batch, float, float, float]:
        """In the thread: push the snapshot into the rollout copy, generate and score. (batch, gen s, start, end)."""
        start = time.perf_counter()
        with torch.no_grad():
            self.model.load_state_dict(state)
        batch, gen_s = self.produce(prompts)
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
