"""Asynchronous rollouts across Ray worker sets (``rollout.async_steps`` with ``resources``, docs/async.md): the
actor on one worker set, the rollout copy on a worker set of its own (``async_rollout``), the actor's weights
pushed to it between steps. One run (worker starts dominate the time) checks the version contract from
metrics.jsonl, that the run learns like the synchronous one and samples what the one-process pipeline samples,
and that a killed rollout worker is recreated with the pipeline queueing afresh."""

from __future__ import annotations

import json
import os
import signal

import pytest
import ray  # the [ray] extra; part of the dev install (scripts/setup.sh dev)

from alignflow.config import ConfigError
from alignflow.trainers.rl import train_rl
from tests.test_online_rl import rl_cfg


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 logical CPUs: one actor worker and one rollout worker (a cluster another test
    started is used as it is)."""
    from alignflow.distributed.ray_group import init_ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _cfg(task, sft, out, k: int, ray_workers: bool):
    return rl_cfg(
        task,
        out,
        sft,
        algo={"name": "grpo"},
        kl={"coef": 0.0},
        rollout={"prompts_per_step": 8, "n": 4, "max_new_tokens": 16, "eval_prompts": 0, "async_steps": k},
        optim={"lr": 1e-3, "scheduler": "constant"},
        train={"batch_size": 32, "max_steps": 16, "num_threads": 1, "save_every": 15},
        resources={"backend": "ray" if ray_workers else "auto"},
    )


def _kill_rollout_worker_at(step: int, monkeypatch) -> list:
    """At the start of ``step``, once that step's batch is ready, SIGKILL the rollout worker: the batch queued
    next (step + 1) fails. Returns the list that receives the killed pid."""
    from alignflow.trainers import rl_async

    real, killed = rl_async.schedule, []

    def killing_schedule(pipeline, roles, st, cfg, total):
        if st.step == step and not killed:
            pipeline.jobs[0].future.result()
            killed.append(roles.placement.sets["async_rollout"].pids[0])
            os.kill(killed[0], signal.SIGKILL)
        return real(pipeline, roles, st, cfg, total)

    monkeypatch.setattr(rl_async, "schedule", killing_schedule)
    return killed


def test_async_on_ray_worker_sets_keeps_the_version_contract_learns_and_survives_a_lost_rollout_worker(
    cluster, reviews_task, reviews_sft, tmp_path, monkeypatch
):
    """GRPO on the reviews task's gold reward from the SFT policy, 16 steps of 8 prompts x 4 samples, one-step-off
    with the actor on a Ray worker (FSDP2, 1 rank) and the rollout on the ``async_rollout`` worker; checkpoints at
    steps 15 and 16. At the start of step 14 the rollout worker is killed, so the batch of step 15 fails.

    Recovery: step 15 raises WorkerLost; the run recreates the worker sets, drops its queue, resumes the step-15
    checkpoint and queues step 15 again from the resumed weights (version 15); metrics.jsonl has one worker_lost
    event (failed at 15, resumed from 15).
    Version contract, from metrics.jsonl: step t (logged at t + 1) trains on rows of version max(0, t - 1) up to
    step 14, so ``rollout/policy_version_min`` = 0, 0, 1, ..., 13 and then 15 after the recovery; the staleness
    0, 1, ..., 1, 0.
    Learning: as in the one-process test (tests/test_async_rollouts.py), the mean gold reward of the last 4 steps
    beats the first 4 by > 0.2, and ends within 0.3 of the synchronous one-process run. The samples are keyed per
    prompt row and the pushed weights are the actor's, so steps 0-14 of the Ray run have the per-step rewards of
    the one-process one-step-off run (to 1e-4: the same sampled tokens)."""
    killed = _kill_rollout_worker_at(14, monkeypatch)
    h = train_rl(_cfg(reviews_task, reviews_sft, tmp_path / "ray", 1, True)).history
    assert killed and len(h) == 16
    logged = [json.loads(line) for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "rollout/policy_version_min" in r]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert [r["rollout/policy_version_min"] for r in rows] == [float(max(0, t - 1)) for t in range(15)] + [15.0]
    assert [r["rollout/staleness_max"] for r in rows] == [0.0] + [1.0] * 14 + [0.0]
    assert [r["rollout/staleness_mean"] for r in rows] == [0.0] + [1.0] * 14 + [0.0]
    assert all("rollout/is_weight_mean" in r for r in rows)
    lost = [r for r in logged if "event/worker_lost" in r]
    assert len(lost) == 1 and lost[0]["event/failed_at_step"] == 15 and lost[0]["event/resumed_from_step"] == 15

    local = train_rl(_cfg(reviews_task, reviews_sft, tmp_path / "local", 1, False)).history
    gold = [r["rollout/reward_mean"] for r in h]
    assert gold[:15] == pytest.approx([r["rollout/reward_mean"] for r in local[:15]], abs=1e-4)
    sync_run = train_rl(_cfg(reviews_task, reviews_sft, tmp_path / "sync", 0, False))
    sync = [r["rollout/reward_mean"] for r in sync_run.history]
    for curve in (gold, sync):
        assert sum(curve[-4:]) / 4 > sum(curve[:4]) / 4 + 0.2, curve
    assert abs(sum(gold[-4:]) - sum(sync[-4:])) / 4 < 0.3, (gold, sync)


def test_a_rollout_set_that_does_not_fit_is_refused_before_any_work(cluster, reviews_task, tmp_path):
    """A cluster of C CPUs (2 from the fixture, or whatever cluster another test left running): the actor worker
    (1 CPU) and C rollout workers (1 CPU each) need C + 1."""
    n = int(ray.cluster_resources()["CPU"])
    cfg = rl_cfg(
        reviews_task,
        tmp_path,
        rollout={"async_steps": 1, "async_workers": n},
        resources={"backend": "ray"},
    )
    with pytest.raises(ConfigError, match=f"'async_rollout' {n} x") as err:
        train_rl(cfg)
    assert not (tmp_path / "metrics.jsonl").exists() and "\n" not in str(err.value)
