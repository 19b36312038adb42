"""Rewards that fail: the ``reward.on_error`` policy (fail / score and count) for exceptions, timeouts and NaN/inf,
the failure metrics, the user-code log line, and a run that survives a reward failing on every row."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig, from_dict, load_config
from alignflow.rewards import CallableReward, CompositeReward, RewardError
from alignflow.rewards.rules import reward_options, user_code_files
from alignflow.trainers import rl as online
from alignflow.trainers.rl_setup import build_sources
from alignflow.trainers.roles import RewardRole


def text_batch(prompts, responses, **fields) -> Batch:
    return Batch(meta={"prompt": list(prompts), "response": list(responses), **fields})


def picky(prompts, responses, **_):
    """Raises on a response containing "boom"; NaN for "nan", inf for "inf", None for "none", else its length."""
    if any("boom" in r for r in responses):
        raise ValueError("cannot score boom")
    table = {"nan": float("nan"), "inf": math.inf, "none": None}
    return [table.get(r, float(len(r))) for r in responses]


def always_fails(prompts, responses, **_):
    raise RuntimeError("the grader is down")


def always_nan(prompts, responses, **_):
    return [float("nan")] * len(prompts)


BATCH = text_batch(["p0", "p1", "p2", "p3", "p4"], ["ab", "boom", "nan", "inf", "none"])


# ------------------------------------------------------------------------------------------------ fail (default)
@pytest.mark.parametrize(
    "response, kind, needle",
    [
        ("boom", "errors", "raised at row 0 (prompt 'p0'): ValueError: cannot score boom"),
        ("nan", "nonfinite", "returned nan (not a finite number) at row 0"),
        ("inf", "nonfinite", "returned inf (not a finite number) at row 0"),
        ("none", "errors", "returned None (not a finite number) at row 0"),
    ],
)
def test_fail_stops_with_the_row_the_function_and_the_cause(response, kind, needle):
    with pytest.raises(RewardError) as e:
        CallableReward(picky)(text_batch(["p0", "p1"], [response, "ok"]))
    assert needle in str(e.value) and "picky" in str(e.value)
    assert e.value.row == 0 and e.value.kind == kind


def test_a_batch_timeout_names_the_config_keys_not_a_python_argument():
    """Before: the message said ``use per_row=True``, which no config key sets."""

    def slow(prompts, responses, **_):
        time.sleep(3)
        return [0.0] * len(prompts)

    with pytest.raises(RewardError, match=r"reward\.per_row=true.*reward\.timeout_s") as e:
        CallableReward(slow, timeout_s=0.2)(text_batch(["a", "b"], ["x", "y"]))
    assert e.value.kind == "timeouts"


# ------------------------------------------------------------------------------------------------ score
def test_score_gives_failed_rows_the_error_score_and_counts_them_by_kind():
    """Rows: "ab" -> 2.0; "boom" raises -> -1 (errors); "nan" -> -1 (nonfinite); "inf" -> -1 (nonfinite);
    "none" -> -1 (errors). The whole-batch call raises (on "boom"), so every row is retried alone."""
    reward = CallableReward(picky, on_error="score", error_score=-1.0)
    values, flags = reward.with_failures(BATCH)
    assert values.tolist() == [2.0, -1.0, -1.0, -1.0, -1.0]
    assert flags["errors"].tolist() == [0, 1, 0, 0, 1]
    assert flags["nonfinite"].tolist() == [0, 0, 1, 1, 0]
    assert flags["timeouts"].tolist() == [0] * 5
    assert reward.failures == {"errors": 2, "timeouts": 0, "nonfinite": 2}


def test_score_covers_timeouts_per_row_and_per_batch():
    def slow_on_c(prompts, responses, **_):
        if "c" in prompts:
            time.sleep(3)
        return [1.0] * len(prompts)

    batch = text_batch(["a", "b", "c"], ["x"] * 3)
    per_row = CallableReward(slow_on_c, timeout_s=0.3, per_row=True, on_error="score", error_score=0.5)
    values, flags = per_row.with_failures(batch)
    assert values.tolist() == [1.0, 1.0, 0.5] and flags["timeouts"].tolist() == [0, 0, 1]
    whole = CallableReward(slow_on_c, timeout_s=0.3, on_error="score", error_score=0.5)
    values, flags = whole.with_failures(batch)  # one call for the batch: every row shares its timeout
    assert values.tolist() == [0.5] * 3 and flags["timeouts"].tolist() == [1, 1, 1]
    assert whole.failures["timeouts"] == 3


def test_only_the_first_failures_are_logged_one_by_one(caplog):
    reward = CallableReward(always_nan, on_error="score")
    with caplog.at_level(logging.WARNING, logger="alignflow.rewards.rules"):
        reward(text_batch(["p"] * 8, ["r"] * 8))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and "further failures of this function are only counted" in lines[-1]
    assert reward.failures["nonfinite"] == 8


def test_bad_policy_arguments():
    with pytest.raises(ValueError, match="on_error='skip' is not one of fail, score"):
        CallableReward(picky, on_error="skip")
    with pytest.raises(ValueError, match="error_score must be a finite number"):
        CallableReward(picky, on_error="score", error_score=float("nan"))


# ------------------------------------------------------------------------------------------------ metrics
def test_failure_counts_reach_the_composite_the_role_and_the_step_metrics():
    """picky on BATCH fails on 2 rows by error and 2 by NaN/inf; a second source that always fails adds 5
    errors: errors = 2 + 5 = 7, nonfinite = 2, timeouts = 0."""
    comp = CompositeReward(
        [(CallableReward(picky, on_error="score"), 1.0), (CallableReward(always_fails, on_error="score"), 1.0)]
    )
    _, metrics = comp.score(BATCH)
    assert (metrics["reward/errors"], metrics["reward/nonfinite"], metrics["reward/timeouts"]) == (7, 2, 0)
    out = RewardRole(comp).score(BATCH)
    assert out["scores_failures/errors"].tolist() == [1, 2, 1, 1, 2]
    rows = Batch({"response_mask": torch.ones(5, 2), **out.tensors}, {"finish_reason": ["stop"] * 5})
    tally = online._Tally()
    tally.add(rows)
    tally.add(rows)  # two sampling rounds in one step: the counts add up
    m = tally.metrics()
    assert (m["reward/errors"], m["reward/nonfinite"], m["reward/timeouts"]) == (14, 4, 0)


# ------------------------------------------------------------------------------------------------ config
def test_config_keys_and_their_errors(tmp_path):
    cfg = load_config(RLConfig, None, ["reward.on_error=score", "reward.error_score=-2", "reward.per_row=true"])
    opts = reward_options(cfg.reward)
    assert (opts["on_error"], opts["error_score"], opts["per_row"]) == ("score", -2.0, True)
    with pytest.raises(ConfigError, match="reward.on_error.*fail.*score"):
        load_config(RLConfig, None, ["reward.on_error=skip"])
    cfg.reward.error_score = float("nan")
    with pytest.raises(ConfigError, match="reward.error_score: must be a finite number"):
        reward_options(cfg.reward)


def test_the_run_logs_which_user_code_it_loads(tmp_path, caplog):
    mine = tmp_path / "my_rewards.py"
    mine.write_text("def shout(prompts, responses, **_):\n    return [float(r.isupper()) for r in responses]\n")
    functions = {f"{mine}:shout": 1.0, "tests.test_reward_safety:picky": 1.0}
    cfg = from_dict(
        RLConfig, {"task": {"name": "arithmetic"}, "reward": {"task": {"accuracy": 1.0}, "functions": functions}}
    )
    with caplog.at_level(logging.INFO, logger="alignflow.trainers.rl_setup"):
        build_sources(cfg.reward, "reward", "arithmetic", cfg, "cpu", 0)
    lines = [r.getMessage() for r in caplog.records if "user code" in r.getMessage()]
    assert len(lines) == 1
    assert str(mine.resolve()) in lines[0] and "test_reward_safety.py" in lines[0]
    assert "arithmetic.py" not in lines[0]  # the built-in task's reward is not user code
    assert user_code_files([CallableReward("alignflow.tasks.arithmetic:accuracy_reward")]) == []


# ------------------------------------------------------------------------------------------------ a run
def test_a_run_survives_a_reward_that_always_fails_and_logs_the_counts(reviews_task, tmp_path):
    """4 rows per step (prompts_per_step 4, n 1), 2 steps, every row fails: reward/errors = 4 per step, and every
    row's reward is error_score = -1, so rollout/reward_mean = -1."""
    base = {
        "model": {"name_or_path": str(reviews_task.model_dir), "tokenizer": str(reviews_task.tokenizer_dir)},
        "data": {"path": str(reviews_task.prompts_path)},
        "task": {"name": reviews_task.name},
        "algo": {"name": "reinforce_pp"},
        "kl": {"coef": 0.0},
        "reward": {
            "functions": {"tests.test_reward_safety:always_fails": 1.0},
            "on_error": "score",
            "error_score": -1.0,
        },
        "rollout": {"prompts_per_step": 4, "n": 1, "max_new_tokens": 4, "eval_prompts": 0},
        "train": {"output_dir": str(tmp_path), "batch_size": 4, "max_steps": 2, "progress": False},
    }
    result = online.train_rl(from_dict(RLConfig, base))
    assert [h["reward/errors"] for h in result.history] == [4.0, 4.0]
    assert all(h["rollout/reward_mean"] == -1.0 for h in result.history)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/errors"] for m in logged if "reward/errors" in m] == [4.0, 4.0]
    base["reward"]["on_error"] = "fail"
    base["train"]["output_dir"] = str(tmp_path / "fail")
    with pytest.raises(RewardError, match="the grader is down"):
        online.train_rl(from_dict(RLConfig, base))


# ------------------------------------------------------------------------------------------------ worker pool
def _job(x):
    """A worker-pool job: "sleep" overruns, "boom" raises, "mem" allocates 3 GiB, "die" kills its worker."""
    import os

    if x == "sleep":
        time.sleep(30)
    if x == "boom":
        raise ValueError("bad")
    if x == "mem":
        return len(bytearray(3 * 2**30))
    if x == "die":
        os._exit(3)
    if x == "hoard":  # keeps 20 MiB more every 10 ms and survives every failed allocation, like a retrying library
        held = []
        while True:
            try:
                held.append(b"\x01" * (20 * 2**20))
            except MemoryError:
                pass
            time.sleep(0.01)
    return x * 2


def test_worker_pool_outcomes_and_replacement():
    """Every kind of outcome in one batch; the items queued behind an overrunning or dying one are not lost."""
    from alignflow.rewards.workers import WorkerPool

    pool = WorkerPool(_job, size=2, timeout_s=1.0, memory_mb=256)
    try:
        items = [(1,), ("sleep",), (2,), ("boom",), ("mem",), ("die",)] + [(i,) for i in range(3, 20)]
        out = pool.map(items)
        assert out[:6] == [
            ("ok", 2),
            ("timeout", None),
            ("ok", 4),
            ("error", "ValueError: bad"),
            ("error", "MemoryError: "),
            ("crash", None),
        ]
        assert out[6:] == [("ok", 2 * i) for i in range(3, 20)]
        assert pool.replaced == 2 and len(pool.pids()) == 2
    finally:
        pool.close()
    assert pool.pids() == []


def test_a_worker_that_survives_its_failed_allocations_is_killed_at_its_memory_limit():
    """A job that swallows MemoryError would run to its timeout under the address-space limit alone; the parent
    sees its resident memory pass 64 MiB and kills it (outcome "memory", not "timeout" after 60 s)."""
    from alignflow.rewards.workers import WorkerPool

    pool = WorkerPool(_job, size=1, timeout_s=60.0, memory_mb=64)
    try:
        assert pool.map([("hoard",), (5,)]) == [("memory", None), ("ok", 10)]
        assert pool.replaced == 1
    finally:
        pool.close()


def test_workers_exit_when_their_parent_dies(tmp_path):
    """A parent killed without cleanup (kill -9) leaves no orphaned workers: they notice within ~1 s."""
    import os
    import subprocess
    import sys

    from alignflow.rewards import workers

    script = (
        "import importlib.util, os\n"  # workers.py alone: no torch import in the child (seconds on CI)
        f"spec = importlib.util.spec_from_file_location('workers', {workers.__file__!r})\n"
        "w = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(w)\n"
        "p = w.WorkerPool(abs, size=2)\np.map([(-1,), (-2,)])\nprint(*p.pids(), flush=True)\nos._exit(0)\n"
    )
    pids = [
        int(x)
        for x in subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    ]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)


def _pool_in_daemon(queue):
    from alignflow.rewards.workers import WorkerPool

    try:
        queue.put(WorkerPool(abs, size=1).map([(-3,)]))
    except BaseException as e:  # noqa: B036 -- reported to the test
        queue.put(repr(e))


def test_a_pool_works_inside_a_daemonic_process():
    """reward.executor=process runs the reward in a multiprocessing pool worker, a daemonic process; before,
    the math checker's pool failed there with "daemonic processes are not allowed to have children"."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_pool_in_daemon, args=(queue,), daemon=True)
    proc.start()
    assert queue.get(timeout=60) == [("ok", 3)]
    proc.join(10)
