"""Asynchronous rollouts across Ray worker sets (``rollout.async_steps`` with ``resources``, docs/async.md): the
actor on one worker set, the rollout copy on a worker set of its own (``async_rollout``), the actor's weights
pushed to it between steps. The version contract is read from metrics.jsonl, and the run learns like the
synchronous one and samples what the one-process pipeline samples."""

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
        train={"batch_size": 32, "max_steps": 16, "num_threads": 1},
        resources={"backend": "ray" if ray_workers else "auto"},
    )


def test_async_on_ray_worker_sets_keeps_the_version_contract_and_learns(cluster, reviews_task, reviews_sft, tmp_path):
    """GRPO on the reviews task's gold reward from the SFT policy, 16 steps of 8 prompts x 4 samples, one-step-off
    with the actor on a Ray worker (FSDP2, 1 rank) and the rollout on the ``async_rollout`` worker.

    Version contract, from metrics.jsonl: step t (logged at t + 1) trains on rows of version max(0, t - 1), so
    ``rollout/policy_version_min`` = 0, 0, 1, ..., 14 and the staleness 0, 1, 1, ..., 1.
    Learning: as in the one-process test (tests/test_async_rollouts.py), the mean gold reward of the last 4 steps
    beats the first 4 by > 0.2, and ends within 0.3 of the synchronous one-process run. The samples are keyed per
    prompt row and the pushed weights are the actor's, so the Ray run's per-step rewards equal those of the
    one-process one-step-off run (to 1e-4: the same sampled tokens)."""
    h = train_rl(_cfg(reviews_task, reviews_sft, tmp_path / "ray", 1, True)).history
    logged = [json.loads(line) for line in (tmp_path / "ray" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in logged if "rollout/policy_version_min" in r]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert [r["rollout/policy_version_min"] for r in rows] == [float(max(0, t - 1)) for t in range(16)]
    assert [r["rollout/staleness_max"] for r in rows] == [0.0] + [1.0] * 15
    assert [r["rollout/staleness_mean"] for r in rows] == [0.0] + [1.0] * 15
    assert all("rollout/is_weight_mean" in r for r in rows)

    local = train_rl(_cfg(reviews_task, reviews_sft, tmp_path / "local", 1, False)).history
    gold = [r["rollout/reward_mean"] for r in h]
    assert gold == pytest.approx([r["rollout/reward_mean"] for r in local], abs=1e-4)
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


def test_a_lost_rollout_worker_is_recreated_and_the_pipeline_queues_again(cluster, reviews_task, tmp_path, monkeypatch):
    """4 steps, one-step-off, a checkpoint every step. At the start of step 2, once step 2's batch is ready, the
    rollout worker is killed: the batch of step 3 (queued then) fails, so step 3 raises WorkerLost; the run
    recreates the worker sets, drops its queue, resumes the step-3 checkpoint and queues step 3 again from the
    resumed weights. metrics.jsonl: versions 0, 0, 1, 3 (staleness 0, 1, 1, 0) and one worker_lost event."""
    from alignflow.trainers import rl_async

    real, killed = rl_async.schedule, []

    def killing_schedule(pipeline, roles, st, cfg, total):
        if st.step == 2 and not killed:
            pipeline.jobs[0].future.result()  # step 2's batch is done; step 3's is queued below
            killed.append(roles.placement.sets["async_rollout"].pids[0])
            os.kill(killed[0], signal.SIGKILL)
        return real(pipeline, roles, st, cfg, total)

    monkeypatch.setattr(rl_async, "schedule", killing_schedule)
    cfg = rl_cfg(
        reviews_task,
        tmp_path,
        algo={"name": "grpo"},
        kl={"coef": 0.0},
        rollout={"prompts_per_step": 2, "n": 2, "max_new_tokens": 4, "eval_prompts": 0, "async_steps": 1},
        train={"batch_size": 4, "max_steps": 4, "save_every": 1, "num_threads": 1},
        resources={"backend": "ray"},
    )
    assert len(train_rl(cfg).history) == 4 and killed
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/policy_version_min" in r]
    assert [r["rollout/policy_version_min"] for r in steps] == [0.0, 0.0, 1.0, 3.0]
    assert [r["rollout/staleness_max"] for r in steps] == [0.0, 1.0, 1.0, 0.0]
    lost = [r for r in rows if "event/worker_lost" in r]
    assert len(lost) == 1 and lost[0]["event/failed_at_step"] == 3 and lost[0]["event/resumed_from_step"] == 3
