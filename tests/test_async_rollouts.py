"""Asynchronous (k-step-off) rollouts in ``alignflow rl`` (``rollout.async_steps``, docs/async.md): the version
contract by version numbers, pushed weights that are never read mid-update, staleness metrics and the importance
correction of stale samples, determinism, one-line refusals, and the learning curve against the synchronous run."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rl_async import VERSION, AsyncRollouts, snapshot
from tests.test_online_rl import rl_cfg


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


@pytest.mark.parametrize("k", [1, 2])
def test_step_t_samples_the_weights_of_version_max_0_t_minus_k(k):
    """The actor's weight is set to its version (t at the start of step t) and the 'update' of each step walks it
    to t + 1 through NaN while the rollout thread is generating. The batch of step t must carry the weight value and
    the version max(0, t - k) -- for k = 1: 0, 0, 1, 2, 3, 4, i.e. the weights after step t - 2 -- and the thread,
    which reads its copy twice 5 ms apart, must never see NaN or a change (weights are pushed, never read live)."""
    actor, twin = Toy(), Toy()
    seen = []

    def produce(prompts, step):
        a = float(twin.w.detach())
        time.sleep(0.005)
        seen.append((a, float(twin.w.detach()), threading.current_thread() is threading.main_thread()))
        return Batch({"w": torch.full((len(prompts),), a)}, {"prompt": prompts["prompt"]}), 0.0

    pipe = AsyncRollouts(twin, produce, k)
    total, got = 6, []
    try:
        for t in range(total):
            with torch.no_grad():
                actor.w.fill_(t)
            pipe.schedule(t, total, lambda: snapshot(actor), lambda: Batch(meta={"prompt": ["p", "q"]}))
            batch, _, waits = pipe.take(t)
            got.append((int(batch[VERSION][0]), float(batch["w"][0])))
            assert set(waits) == {"perf/rollout_wait_s", "perf/train_wait_s"}
            with torch.no_grad():  # a slow in-place update, NaN half-way
                actor.w.fill_(float("nan"))
                time.sleep(0.01)
                actor.w.fill_(t + 1)
    finally:
        pipe.close()
    want = [max(0, t - k) for t in range(total)]
    assert got == [(v, float(v)) for v in want]
    assert all(a == b and not main for a, b, main in seen) and len(seen) == total


def test_pending_rows_and_no_batch_past_the_end():
    """k = 2, 3 steps: step 0 queues steps 0, 1, 2 (2 rows each: 6 pending); nothing is queued past the last step."""
    pipe = AsyncRollouts(Toy(), lambda p, step: (Batch({"x": torch.zeros(len(p))}, {"prompt": p["prompt"]}), 0.0), 2)
    try:
        pipe.schedule(0, 3, lambda: {"w": torch.zeros(())}, lambda: Batch(meta={"prompt": ["a", "b"]}))
        assert pipe.pending_rows == 6 and [j.step for j in pipe.jobs] == [0, 1, 2]
        pipe.take(0)
        pipe.schedule(1, 3, lambda: {"w": torch.zeros(())}, lambda: Batch(meta={"prompt": ["a", "b"]}))
        assert [j.step for j in pipe.jobs] == [1, 2]
        with pytest.raises(RuntimeError, match="no batch queued for step 2"):
            pipe.take(2)
    finally:
        pipe.close()


def test_reset_drops_the_queue_and_queues_again_from_the_resumed_step():
    """What the recovery from a lost worker does: k = 1, steps 0 and 1 queued at step 0, step 0 trained, step 2
    queued at step 1; then reset (the run resumes its step-1 checkpoint): nothing is pending, and scheduling at
    step 1 queues steps 1 and 2 again, sampled from version 1."""
    pipe = AsyncRollouts(Toy(), lambda p, step: (Batch({"x": torch.zeros(len(p))}, {"prompt": p["prompt"]}), 0.0), 1)
    take = lambda: Batch(meta={"prompt": ["a", "b"]})  # noqa: E731
    try:
        pipe.schedule(0, 5, lambda: {"w": torch.zeros(())}, take)
        pipe.take(0)
        pipe.schedule(1, 5, lambda: {"w": torch.ones(())}, take)
        pipe.reset()
        assert pipe.pending_rows == 0 and not pipe.jobs
        pipe.schedule(1, 5, lambda: {"w": torch.ones(())}, take)
        assert [j.step for j in pipe.jobs] == [1, 2]
        assert int(pipe.take(1)[0][VERSION][0]) == 1
    finally:
        pipe.close()


def _async_run(reviews_task, out, k, steps=4, **sections):
    cfg = rl_cfg(
        reviews_task,
        out,
        algo={"name": "grpo"},
        rollout={"prompts_per_step": 2, "n": 2, "max_new_tokens": 6, "eval_prompts": 0, "async_steps": k},
        train={"batch_size": 4, "max_steps": steps},
        **sections,
    )
    return train_rl(cfg)


def test_trainer_reports_versions_staleness_and_corrects_stale_samples(reviews_task, tmp_path):
    """async_steps=1, 4 steps: the rows of step t were sampled from version max(0, t - 1) (staleness 0, 1, 1, 1).
    lp_old is recomputed (``auto`` does not reuse stale sampler log-probs) and the TIS weights apply: at step 0
    the sampler's log-probs are the trainer's (|diff| ~ 0), from step 1 on they are one update old (|diff| > 0).
    The same seed gives the same weights again."""
    a = _async_run(reviews_task, tmp_path / "a", 1)
    h = a.history
    assert [r["rollout/policy_version_min"] for r in h] == [0.0, 0.0, 1.0, 2.0]
    assert [r["rollout/staleness_max"] for r in h] == [0.0, 1.0, 1.0, 1.0]
    assert [r["rollout/staleness_mean"] for r in h] == [0.0, 1.0, 1.0, 1.0]
    assert all("rollout/is_weight_mean" in r and r["perf/rollout_wait_s"] >= 0 for r in h)
    assert h[0]["rollout/logprob_abs_diff"] < 1e-5 < min(r["rollout/logprob_abs_diff"] for r in h[1:])
    b = _async_run(reviews_task, tmp_path / "b", 1)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_vllm_backend_is_refused_in_one_line(reviews_task, tmp_path):
    cfg = rl_cfg(reviews_task, tmp_path, rollout={"async_steps": 1, "backend": "vllm"})
    with pytest.raises(ConfigError, match="rollout.async_steps=1 needs rollout.backend: builtin") as err:
        train_rl(cfg)
    assert "\n" not in str(err.value)


def test_async_learning_curve_tracks_the_synchronous_one(reviews_task, reviews_sft, tmp_path):
    """GRPO on the reviews task's gold reward from the SFT policy, 16 steps of 8 prompts x 4 samples, synchronous
    and one-step-off: both raise the mean gold reward of their samples (last 4 steps against the first 4) and end
    within 0.3 of each other. Measured (seeds 0, 1, 2): sync -1.56 -> -1.14, -2.00 -> -1.59, -1.77 -> -1.30;
    async -1.68 -> -1.15, -2.01 -> -1.74, -1.96 -> -1.28 (end gaps 0.01, 0.15, 0.02)."""
    ends = []
    for k in (0, 1):
        cfg = rl_cfg(
            reviews_task,
            tmp_path / f"k{k}",
            reviews_sft,
            algo={"name": "grpo"},
            kl={"coef": 0.0},
            rollout={"prompts_per_step": 8, "n": 4, "max_new_tokens": 16, "eval_prompts": 0, "async_steps": k},
            optim={"lr": 1e-3, "scheduler": "constant"},
            train={"batch_size": 32, "max_steps": 16},
        )
        gold = [h["rollout/reward_mean"] for h in train_rl(cfg).history]
        first, last = sum(gold[:4]) / 4, sum(gold[-4:]) / 4
        assert last > first + 0.2, (k, gold)
        ends.append(last)
    assert abs(ends[0] - ends[1]) < 0.3, ends


def test_checkpoint_gives_back_the_prompts_of_queued_batches():
    """2 prompts per step, async_steps=1, after step 1: steps 0, 1, 2 have taken 6 prompt rows, the batch of step
    2 (2 rows) is still queued, so the checkpoint's prompt position is 6 - 2 = 4 = the rows of the 2 trained steps."""
    from alignflow.algorithms.kl import make_kl_controller
    from alignflow.trainers.rl import RLState
    from alignflow.trainers.rl_setup import PromptStream

    stream = PromptStream([{"prompt": str(i), "prompt_ids": [i]} for i in range(10)], seed=0)
    st = RLState(stream, make_kl_controller("fixed", 0.1, 6.0, 10000.0))
    pipe = AsyncRollouts(Toy(), lambda p, step: (Batch({"x": torch.zeros(len(p))}, {"prompt": p["prompt"]}), 0.0), 1)
    st.pipeline = pipe
    try:
        for step in (0, 1):  # what the loop does: queue at the start of the step, take the step's batch, train
            pipe.schedule(step, 5, lambda: {"w": torch.zeros(())}, lambda: stream.take(2))
            pipe.take(step)
        st.step = 2
        assert stream.position == 6 and pipe.pending_rows == 2
        assert st.state_dict()["prompt_position"] == 4
    finally:
        pipe.close()


def test_dapo_refill_rounds_sample_the_current_version(reviews_task, reviews_sft, tmp_path):
    """DAPO's dynamic sampling with async_steps=1 and 1-token responses in groups of 2 (many tied groups): the first
    round of each step comes from the queue (one version old from step 1 on), the refill rounds from the current
    weights (staleness 0), so a refilled step's mean staleness is below 1 and its maximum stays 1 (measured: 0.75,
    0.5, 0.75 on steps 1-3, two rounds each)."""
    cfg = rl_cfg(
        reviews_task,
        tmp_path,
        reviews_sft,
        algo={"name": "dapo"},
        kl={"coef": 0.0},
        dapo={"dynamic_sampling": True, "max_sample_rounds": 3},
        rollout={"prompts_per_step": 4, "n": 2, "max_new_tokens": 1, "eval_prompts": 0, "async_steps": 1},
        train={"batch_size": 8, "max_steps": 4},
    )
    h = train_rl(cfg).history
    assert all(r["rollout/staleness_max"] <= 1.0 for r in h) and h[0]["rollout/staleness_max"] == 0.0
    refilled = [r for r in h[1:] if r["rollout/sample_rounds"] > 1]
    assert refilled and all(0.0 < r["rollout/staleness_mean"] < 1.0 for r in refilled), h
