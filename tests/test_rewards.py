"""Reward shaping (PAR and friends), running normalisation, rule rewards with timeouts, composite rewards."""

import math
import time

import pytest
import torch

from alignflow.batch import Batch
from alignflow.rewards import (
    CallableReward,
    CompositeReward,
    RewardError,
    RewardLoadError,
    RunningNorm,
    apply_shaping,
    load_callable,
)
from alignflow.rewards.shaping import centered, clip, lsc, minmax, par, tanh
from tests import reward_fns


# ------------------------------------------------------------------------------------------------ shaping
def test_par_hand_values():
    """PAR = mean_m sigmoid(r - r_ref_m).
    r = 1, r_ref = 0:        sigmoid(1) = 1 / (1 + e^-1) = 0.7310586
    r = 0, r_ref = (0, 2):   (sigmoid(0) + sigmoid(-2)) / 2 = (0.5 + 0.1192029) / 2 = 0.3096015
    r = r_ref = 3.7:         sigmoid(0) = 0.5
    """
    r = torch.tensor([1.0, 0.0, 3.7])
    ref = torch.tensor([[0.0, 0.0], [0.0, 2.0], [3.7, 3.7]])
    out = par(r, ref)
    assert torch.allclose(out, torch.tensor([0.7310586, 0.3096015, 0.5]), atol=1e-6)
    assert par(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(0.7310586, abs=1e-6)  # (B,) ref


def test_par_is_half_at_the_reference_monotone_and_bounded():
    ref = torch.randn(5, 4)
    r_eq = ref[:, 0]
    assert torch.allclose(par(r_eq, ref[:, :1]), torch.full((5,), 0.5))
    grid = torch.linspace(-10, 10, 101, dtype=torch.float64)  # float64: sigmoid saturates later than float32
    vals = par(grid, torch.zeros(101, 3, dtype=torch.float64) + torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64))
    assert (vals[1:] > vals[:-1]).all()
    assert (vals > 0).all() and (vals < 1).all()


def test_par_matches_an_explicit_loop():
    r, ref = torch.randn(6), torch.randn(6, 5)
    loop = torch.tensor(
        [sum(1 / (1 + math.exp(-(r[i].item() - ref[i, m].item()))) for m in range(5)) / 5 for i in range(6)]
    )
    assert torch.allclose(par(r, ref), loop, atol=1e-6)


def test_other_shapings_hand_values():
    """centered: 3 - mean(1, 2) = 1.5.  clip(5, -1, 2) = 2.  minmax(1, 0, 4) = 0.25.
    tanh(r=2, ref=1) = tanh(1) = 0.7615942.
    lsc with ref (0, 1, 2, 3, 4), q = 0.85: position 0.85 * 4 = 3.4 -> quantile 3.4; r = 3.4 -> log(1/2) = -0.6931472.
    """
    assert centered(torch.tensor([3.0]), torch.tensor([[1.0, 2.0]])).item() == pytest.approx(1.5)
    assert clip(torch.tensor([5.0, -3.0, 0.5]), -1.0, 2.0).tolist() == [2.0, -1.0, 0.5]
    assert minmax(torch.tensor([1.0]), 0.0, 4.0).item() == pytest.approx(0.25)
    assert minmax(torch.tensor([2.0, 4.0, 6.0])).tolist() == [0.0, 0.5, 1.0]  # batch min / max
    assert tanh(torch.tensor([2.0]), torch.tensor([1.0])).item() == pytest.approx(0.7615942, abs=1e-6)
    ref = torch.arange(5.0)[None]  # (1, 5)
    assert lsc(torch.tensor([3.4]), ref).item() == pytest.approx(-0.6931472, abs=1e-6)
    glob = lsc(torch.tensor([3.4, 3.4]), torch.arange(5.0))  # 1-D set of 5 != B = 2: one global quantile
    assert torch.allclose(glob, torch.full((2,), -0.6931472))


def test_apply_shaping_checks_names_and_references():
    r, ref = torch.tensor([1.0]), torch.tensor([[0.0]])
    assert apply_shaping("par", r, ref).item() == pytest.approx(0.7310586, abs=1e-6)
    assert apply_shaping("clip", r, low=0.0, high=0.5).item() == 0.5
    with pytest.raises(ValueError, match="needs the reference"):
        apply_shaping("par", r)
    with pytest.raises(ValueError, match="choose one of"):
        apply_shaping("sigmoid", r, ref)
    with pytest.raises(ValueError, match="r_ref must be"):
        par(torch.zeros(3), torch.zeros(2, 4))


def test_running_norm_batched_equals_all_at_once():
    torch.manual_seed(0)
    data = torch.randn(1000, dtype=torch.float64) * 3 + 7
    norm = RunningNorm()
    for chunk in torch.split(data, [1, 7, 100, 2, 500, 390]):
        norm.update(chunk)
    assert norm.count == 1000
    assert norm.mean == pytest.approx(data.mean().item(), rel=1e-12)
    assert norm.var == pytest.approx(data.var(unbiased=False).item(), rel=1e-10)
    other = RunningNorm()
    other.load_state_dict(norm.state_dict())
    assert other.state_dict() == norm.state_dict()


def test_running_norm_normalize_hand_values():
    """Values 1, 2, 3: mean 2, population variance 2/3, std 0.8164966 -> (-1.2247449, 0, 1.2247449);
    without the mean: 3 / 0.8164966 = 3.6742346."""
    norm = RunningNorm(eps=0.0)
    out = norm.normalize(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(out, torch.tensor([-1.2247449, 0.0, 1.2247449]), atol=1e-6)
    assert norm.normalize(torch.tensor([3.0]), subtract_mean=False, update=False).item() == pytest.approx(3.6742346)
    with pytest.raises(ValueError, match="NaN"):
        norm.update(torch.tensor([float("nan")]))


# ------------------------------------------------------------------------------------------------ rule rewards
def text_batch(prompts, responses, **fields):
    return Batch(meta={"prompt": prompts, "response": responses, **fields})


def fails_on_bad(prompts, responses, **_):
    if any("bad" in p for p in prompts):
        raise ValueError("cannot score this")
    return [1.0] * len(prompts)


def test_error_on_a_row_names_the_row_and_the_prompt():
    prompts = [f"prompt {i}" for i in range(6)]
    prompts[3] = "prompt 3 is bad"
    with pytest.raises(RewardError) as info:
        CallableReward(fails_on_bad)(text_batch(prompts, ["r"] * 6))
    err = info.value
    assert err.row == 3 and "row 3" in str(err) and "prompt 3 is bad" in str(err)
    assert "fails_on_bad" in str(err) and "cannot score this" in str(err)


def test_sleeping_function_times_out_quickly():
    def slow(prompts, responses, **_):
        time.sleep(3)
        return [0.0] * len(prompts)

    t0 = time.perf_counter()
    with pytest.raises(RewardError, match="timed out after 0.2 s"):
        CallableReward(slow, timeout_s=0.2)(text_batch(["a", "b"], ["x", "y"]))
    assert time.perf_counter() - t0 < 2.0


def test_per_row_timeout_names_the_slow_row():
    def slow_on_c(prompts, responses, **_):
        if "c" in prompts:
            time.sleep(3)
        return [0.0] * len(prompts)

    with pytest.raises(RewardError, match="row 2") as info:
        CallableReward(slow_on_c, timeout_s=0.2, per_row=True)(text_batch(["a", "b", "c"], ["x"] * 3))
    assert info.value.row == 2


@pytest.mark.parametrize(
    "result, message, row",
    [
        (lambda n: [1.0] * (n - 1), "returned 2 values for 3 rows", None),
        (lambda n: [1.0, float("nan"), 0.0], "at row 1", 1),
        (lambda n: [1.0, 2.0, "high"], "at row 2", 2),
        (lambda n: None, "expected a list of 3 numbers", None),
    ],
)
def test_bad_results_are_reported(result, message, row):
    reward = CallableReward(lambda prompts, responses, **_: result(len(prompts)), name="bad")
    with pytest.raises(RewardError, match=message) as info:
        reward(text_batch(["p0", "p1", "p2"], ["a", "b", "c"]))
    assert info.value.row == row


def test_fields_reach_the_function_and_values_come_back_per_row():
    """arithmetic.accuracy_reward takes ``answers``; the batch field is ``answer``. The third answer is
    deliberately wrong (the computed one would be 9), which proves the field, not the prompt, is used."""
    reward = CallableReward("alignflow.tasks.arithmetic:accuracy_reward")
    batch = text_batch(["1+1=", "2+3=", "4+5="], ["2", "6", "9"], answer=["2", "5", "10"], prompt_index=[0, 1, 2])
    out = reward(batch)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0, 0.0]
    as_tensor = CallableReward(lambda prompts, responses, **_: torch.tensor([0.5] * len(prompts)), name="t")
    assert as_tensor(batch).tolist() == [0.5, 0.5, 0.5]
    seen = {}

    def spy(prompts, responses, answer, **kw):
        seen.update(answer=answer, **kw)
        return [0.0] * len(prompts)

    CallableReward(spy)(batch)
    assert seen == {"answer": ["2", "5", "10"], "prompt_index": [0, 1, 2]}
    with pytest.raises(KeyError, match="'response'"):
        reward(Batch(meta={"prompt": ["1+1="]}))


def test_process_executor_scores_and_kills_a_stuck_worker():
    batch = text_batch(["a", "b"], ["xyz", ""])
    ok = CallableReward(reward_fns.lengths, executor="process", timeout_s=60)
    assert ok(batch).tolist() == [3.0, 0.0]
    ok.close()
    stuck = CallableReward(reward_fns.sleepy, executor="process", timeout_s=1.0)
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match="timed out"):
        stuck(batch)
    assert stuck._pool is None and time.perf_counter() - t0 < 20
    with pytest.raises(ValueError, match="module level"):
        CallableReward(lambda p, r: [0.0] * len(p), executor="process")


def test_load_callable_errors_name_the_path(tmp_path, monkeypatch):
    assert load_callable("alignflow.tasks.arithmetic:format_reward")(["1+1="], ["2"]) == [1.0]
    with pytest.raises(RewardLoadError, match="expected 'module:function'"):
        load_callable("alignflow.tasks.arithmetic.format_reward")
    with pytest.raises(RewardLoadError, match="'no_such_pkg.rewards:f': no module named 'no_such_pkg'"):
        load_callable("no_such_pkg.rewards:f")
    with pytest.raises(RewardLoadError, match="has no attribute 'acuracy_reward'.*accuracy_reward"):
        load_callable("alignflow.tasks.arithmetic:acuracy_reward")
    with pytest.raises(RewardLoadError, match="'DIGITS' is a int, not a callable"):
        load_callable("alignflow.tasks.arithmetic:DIGITS")
    broken = tmp_path / "broken_rewards.py"
    broken.write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardLoadError, match="imports the missing module 'not_a_real_dependency_xyz'"):
        load_callable("broken_rewards:f")
    mine = tmp_path / "my_rewards.py"
    mine.write_text("def shout(prompts, responses, **_):\n    return [float(r.isupper()) for r in responses]\n")
    assert load_callable(f"{mine}:shout")(["p", "q"], ["HI", "hi"]) == [1.0, 0.0]
    with pytest.raises(RewardLoadError, match="does not exist"):
        load_callable(f"{tmp_path / 'nope.py'}:shout")


# ------------------------------------------------------------------------------------------------ composite
def test_composite_is_the_weighted_sum_with_per_component_metrics():
    """lengths = (3, 0, 1); constant = (1, 1, 1); total = 1 * lengths + 0.5 * constant = (3.5, 0.5, 1.5);
    metrics: lengths mean 4/3, constant mean 1, total mean 5.5/3."""
    batch = text_batch(["a", "b", "c"], ["xyz", "", "q"])
    comp = CompositeReward([(CallableReward(reward_fns.lengths), 1.0), ("constant", lambda b: torch.ones(len(b)), 0.5)])
    total, metrics = comp.score(batch)
    assert total.tolist() == [3.5, 0.5, 1.5]
    assert metrics["rollout/reward_lengths_mean"] == pytest.approx(4 / 3)
    assert metrics["rollout/reward_constant_mean"] == pytest.approx(1.0)
    assert metrics["rollout/reward_mean"] == pytest.approx(5.5 / 3)
    assert torch.equal(comp(batch), total)
    with pytest.raises(ValueError, match="two components are named 'lengths'"):
        CompositeReward([(CallableReward(reward_fns.lengths), 1.0), (CallableReward(reward_fns.lengths), 2.0)])
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        CompositeReward([("short", lambda b: torch.ones(2), 1.0)])(batch)
