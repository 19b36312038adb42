"""Pairwise RLHF in ``alignflow rl``: the pairwise source's preferences and the ``pairwise`` advantage step,
against hand-derived values; the load-time rules."""

import pytest
import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig, load_config
from alignflow.rewards import CompositeReward
from alignflow.rewards.pairwise import JudgePairScorer, PairwiseReward
from alignflow.trainers.rl_algos import AdvContext, advantage_metrics, compute_advantages, resolve
from alignflow.trainers.roles import RewardRole


class TableScorer:
    """P(first beats second | first shown first) from a table of (first, second) -> p; measured symmetrising."""

    def __init__(self, table):
        self.table = table

    def ordered(self, prompts, firsts, seconds):
        p = [self.table[a, b] for a, b in zip(firsts, seconds, strict=True)]
        return torch.tensor(p, dtype=torch.float64), torch.zeros(len(firsts))

    @staticmethod
    def symmetrise(p_ab, p_ba):
        return 0.5 * (p_ab + 1.0 - p_ba)


def _rl_batch(responses, groups, width=3):
    b = len(responses)
    return Batch(
        {
            "response_mask": torch.ones(b, width),
            "old_logprobs": torch.zeros(b, width),
        },
        {"prompt": ["p"] * b, "response": list(responses), "group": list(groups)},
    )


def _ctx(**kw):
    return AdvContext(beta=0.0, estimator="k3", gamma=1.0, lam=1.0, whiten=False, reinforce_pp_baseline=False, **kw)


def _algo(name="pairwise_grpo", **over):
    cfg = load_config(RLConfig, None, [f"algo.name={name}", "reward.pairwise.model=pm-dir", "rollout.n=4"])
    for k, v in over.items():
        section, key = k.split("__")
        setattr(getattr(cfg, section), key, v)
    return cfg, resolve(cfg)


def test_group_preferences_win_rates_and_symmetry_error():
    """Group (a, b, c) with one-order readings p(a,b)=0.8, p(b,a)=0.4, p(a,c)=0.9, p(c,a)=0.1, p(b,c)=0.6,
    p(c,b)=0.6. Symmetric P = (p_ab + 1 - p_ba)/2: P[a,b] = (0.8+0.6)/2 = 0.7, P[a,c] = (0.9+0.9)/2 = 0.9,
    P[b,c] = (0.6+0.4)/2 = 0.5. Win rates: a (0.7+0.9)/2 = 0.8, b (0.3+0.5)/2 = 0.4, c (0.1+0.5)/2 = 0.3.
    Symmetry errors |p_ab + p_ba - 1| averaged over each row's two comparisons: a (0.2 + 0)/2 = 0.1,
    b (0.2 + 0.2)/2 = 0.2, c (0 + 0.2)/2 = 0.1. Row d is alone in its group: win rate 1/2."""
    p = {("a", "b"): 0.8, ("b", "a"): 0.4, ("a", "c"): 0.9, ("c", "a"): 0.1, ("b", "c"): 0.6, ("c", "b"): 0.6}
    src = PairwiseReward(TableScorer(p))
    batch = _rl_batch(["a", "b", "c", "d"], [7, 7, 7, 9])
    values, fails = src.with_failures(batch)
    assert values.tolist() == pytest.approx([0.8, 0.4, 0.3, 0.5])
    assert fails["errors"].tolist() == [0, 0, 0, 0]
    f = src.last_fields
    assert f["pair_prefs"][0].tolist() == pytest.approx([0.5, 0.7, 0.9])
    assert f["pair_prefs"][2].tolist() == pytest.approx([0.1, 0.5, 0.5])
    assert f["pair_group_size"].tolist() == [3, 3, 3, 1]
    assert f["pair_symmetry_error"].tolist() == pytest.approx([0.1, 0.2, 0.1, 0.0])


def test_pairwise_advantage_step_reads_the_reward_roles_fields():
    """The reward role adds the source's fields; the pairwise advantage is the win rate - 1/2 (0.8, 0.4, 0.3 ->
    0.3, -0.1, -0.2; the lone row 0), on every token; metrics: mean win rate (0.8+0.4+0.3)/3 = 0.5, best 0.8."""
    p = {("a", "b"): 0.8, ("b", "a"): 0.4, ("a", "c"): 0.9, ("c", "a"): 0.1, ("b", "c"): 0.6, ("c", "b"): 0.6}
    role = RewardRole(CompositeReward([("pairwise", PairwiseReward(TableScorer(p)), 1.0)]))
    batch = _rl_batch(["a", "b", "c", "d"], [7, 7, 7, 9])
    batch = batch.union(role.score(batch))
    assert "pair_prefs" in batch and batch["scores"].tolist() == pytest.approx([0.8, 0.4, 0.3, 0.5])
    _, algo = _algo()
    adv = compute_advantages(batch, algo, _ctx())["advantages"]
    assert adv[:, 0].tolist() == pytest.approx([0.3, -0.1, -0.2, 0.0])
    assert adv[0].tolist() == pytest.approx([0.3] * 3)
    m = advantage_metrics(batch.union(Batch({"advantages": adv})))
    assert m["pairwise/win_rate_mean"] == pytest.approx(0.5)
    assert m["pairwise/best_win_rate"] == pytest.approx(0.8)
    assert m["pairwise/symmetry_error"] == pytest.approx((0.1 + 0.2 + 0.1) / 4)


def test_anchor_advantages_with_and_without_centre():
    """Anchor readings p(y, anchor) / p(anchor, y): a 0.9/0.3 -> P = (0.9 + 0.7)/2 = 0.8; b 0.4/0.6 -> 0.4.
    A = p - 1/2: 0.3, -0.1; centred on the group mean 0.6: 0.2, -0.2. Symmetry errors 0.2 and 0.0."""
    p = {("a", "R"): 0.9, ("R", "a"): 0.3, ("b", "R"): 0.4, ("R", "b"): 0.6}
    src = PairwiseReward(TableScorer(p), anchor="reference")
    batch = _rl_batch(["a", "b"], [1, 1])
    batch.meta["reference"] = ["R", "R"]
    batch = batch.union(RewardRole(CompositeReward([("pairwise", src, 1.0)])).score(batch))
    assert batch["anchor_prefs"].tolist() == pytest.approx([0.8, 0.4])
    assert batch["pair_symmetry_error"].tolist() == pytest.approx([0.2, 0.0])
    _, algo = _algo()
    assert compute_advantages(batch, algo, _ctx())["advantages"][:, 0].tolist() == pytest.approx([0.3, -0.1])
    centred = compute_advantages(batch, algo, _ctx(pairwise_center=True))["advantages"][:, 0]
    assert centred.tolist() == pytest.approx([0.2, -0.2])
    batch.meta["reference"] = ["R", None]
    with pytest.raises(Exception, match="row 1 has no 'reference'"):
        src(batch)


def test_judge_scorer_reads_one_order_per_question():
    """A judge that always names the longer response: ordered reading 1 when the first is longer, 0 otherwise;
    so P(long > short) = (1 + 1 - 0)/2 = 1 and the win rates of ("xxx", "x") are 1 and 0."""
    from alignflow.rewards.judge import JudgeReward

    class Longer:
        def complete(self, questions, temperature=0.0, attempt=0):
            out = []
            for q in questions:
                a = q.split("Response A:\n")[1].split("\n\nResponse B:")[0]
                b = q.split("Response B:\n")[1].split("\n\n")[0]
                out.append("Verdict: A" if len(a) > len(b) else "Verdict: B")
            return out

    src = PairwiseReward(JudgePairScorer(JudgeReward(Longer(), "pairwise")))
    assert src(_rl_batch(["xxx", "x"], [3, 3])).tolist() == [1.0, 0.0]


def test_load_time_rules_name_the_keys():
    with pytest.raises(ConfigError, match="reward.pairwise.model"):
        resolve(load_config(RLConfig, None, ["algo.name=pairwise_grpo", "rollout.n=4"]))
    with pytest.raises(ConfigError, match="reward.normalize"):
        _algo(reward__normalize="running")
    with pytest.raises(ConfigError, match="rollout.n must be >= 2"):
        resolve(
            load_config(
                RLConfig,
                None,
                [
                    "algo.name=grpo",
                    "algo.advantage=pairwise",
                    "rollout.n=1",
                    "train.batch_size=16",
                    "reward.pairwise.model=x",
                ],
            )
        )


def test_pairwise_verdicts_of_the_reviews_judge_and_its_question_format():
    """The tiny reviews judge ends with "overall this ." (first) or "overall that ." (second); the last verdict of
    either form counts. Its question is '{prompt}{a} {prompt}{b}' as plain text; an unknown field is refused."""
    from alignflow.rewards.judge import JudgeReward, parse_verdict

    assert parse_verdict("pairwise", "this : good . that : bad . overall this .") == 1.0
    assert parse_verdict("pairwise", "overall this . no , overall that .") == 0.0
    assert parse_verdict("pairwise", "Verdict: A") == 1.0 and parse_verdict("pairwise", "this : plain .") is None

    class Record:
        def __init__(self):
            self.asked = []

        def complete(self, questions, temperature=0.0, attempt=0):
            self.asked += questions
            return ["overall that ."] * len(questions)

    backend = Record()
    judge = JudgeReward(backend, "pairwise", question="{prompt}{a} {prompt}{b}")
    src = PairwiseReward(JudgePairScorer(judge))
    batch = Batch(
        meta={"prompt": ["Review : the plot"] * 2, "response": [" was good .", " was bad ."], "group": [0, 0]}
    )
    assert src(batch).tolist() == [0.5, 0.5]  # the judge always names the second: each order cancels the other
    assert "Review : the plot was good . Review : the plot was bad ." in backend.asked
    with pytest.raises(ValueError, match="nope"):
        JudgeReward(backend, "pairwise", question="{prompt} {nope}")


def test_pairwise_advantage_adds_the_kl_return_when_the_kl_is_in_the_reward():
    """kl.placement=reward, β = 0.5, k1 = lp_old - lp_ref = 0.2 on each of 3 tokens: the KL return is
    -0.5 * 0.2 * 3 = -0.3, added to the win-rate advantages 0.3, -0.1, -0.2 -> 0.0, -0.4, -0.5."""
    p = {("a", "b"): 0.8, ("b", "a"): 0.4, ("a", "c"): 0.9, ("c", "a"): 0.1, ("b", "c"): 0.6, ("c", "b"): 0.6}
    batch = _rl_batch(["a", "b", "c"], [7, 7, 7])
    batch = batch.union(RewardRole(CompositeReward([("pairwise", PairwiseReward(TableScorer(p)), 1.0)])).score(batch))
    batch["ref_logprobs"] = torch.full((3, 3), -0.2)
    _, algo = _algo()
    ctx = AdvContext(beta=0.5, estimator="k1", gamma=1.0, lam=1.0, whiten=False, reinforce_pp_baseline=False)
    assert compute_advantages(batch, algo, ctx)["advantages"][:, 0].tolist() == pytest.approx(
        [0.0, -0.4, -0.5], abs=1e-6
    )
