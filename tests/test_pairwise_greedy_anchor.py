"""Pairwise RLHF against the policy's greedy response (``reward.pairwise.anchor: greedy``, docs/pairwise_rlhf.md):
the source's value and the advantage against hand-derived numbers, the controller's greedy decode matched to the
samples by group, and a short ``alignflow rl`` run in which every comparison is against its prompt's greedy answer."""

import pytest
import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig, load_config
from alignflow.rewards import CompositeReward
from alignflow.rewards.pairwise import GREEDY_ANCHOR, PairwiseReward
from alignflow.trainers import rl_setup
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rl_algos import AdvContext, compute_advantages, resolve
from alignflow.trainers.rl_pairwise import greedy_anchors
from alignflow.trainers.roles import RewardRole


class TableScorer:
    """One-order readings p(first, second) from a table; every question asked is recorded."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def ordered(self, prompts, firsts, seconds):
        self.asked += list(zip(firsts, seconds, strict=True))
        p = [self.table[a, b] for a, b in zip(firsts, seconds, strict=True)]
        return torch.tensor(p, dtype=torch.float64), torch.zeros(len(firsts))

    @staticmethod
    def symmetrise(p_ab, p_ba):
        return 0.5 * (p_ab + 1.0 - p_ba)


def _ctx(center=False):
    return AdvContext(
        beta=0.0, estimator="k3", gamma=1.0, lam=1.0, whiten=False, reinforce_pp_baseline=False, pairwise_center=center
    )


def _algo():
    over = [
        "algo.name=pairwise_grpo",
        "reward.pairwise.model=pm-dir",
        "reward.pairwise.anchor=greedy",
        "rollout.n=2",
        "train.batch_size=8",
    ]
    return resolve(load_config(RLConfig, None, over))


TABLE = {
    ("a", "G1"): 0.9,
    ("G1", "a"): 0.3,
    ("b", "G1"): 0.2,
    ("G1", "b"): 0.6,
    ("c", "G2"): 0.7,
    ("G2", "c"): 0.5,
    ("d", "G2"): 0.1,
    ("G2", "d"): 0.9,
}


def test_greedy_anchor_values_and_advantages():
    """Group 1 (anchor G1): a, b and G1 itself; group 2 (anchor G2): c, d. P(y > G) = (p(y, G) + 1 - p(G, y)) / 2:
    a (0.9 + 0.7)/2 = 0.8, b (0.2 + 0.4)/2 = 0.3, G1 = its own anchor: 1/2 exactly, never asked;
    c (0.7 + 0.5)/2 = 0.6, d (0.1 + 0.1)/2 = 0.1. Advantages p - 1/2: 0.3, -0.2, 0, 0.1, -0.4. Centred on the
    group means (0.8 + 0.3 + 0.5)/3 = 1.6/3 and (0.6 + 0.1)/2 = 0.35: 0.8 - 1.6/3 = 0.8/3, 0.3 - 1.6/3 = -0.7/3,
    0.5 - 1.6/3 = -0.1/3, 0.25, -0.25. Symmetry errors |p(y, G) + p(G, y) - 1|: 0.2, 0.2, 0, 0.2, 0."""
    scorer = TableScorer(TABLE)
    role = RewardRole(CompositeReward([("pairwise", PairwiseReward(scorer, anchor="greedy"), 1.0)]))
    batch = Batch(
        {"response_mask": torch.ones(5, 2), "old_logprobs": torch.zeros(5, 2)},
        {
            "prompt": ["p1"] * 3 + ["p2"] * 2,
            "response": ["a", "b", "G1", "c", "d"],
            "group": [1, 1, 1, 2, 2],
            GREEDY_ANCHOR: ["G1"] * 3 + ["G2"] * 2,
        },
    )
    batch = batch.union(role.score(batch))
    assert batch["anchor_prefs"].tolist() == pytest.approx([0.8, 0.3, 0.5, 0.6, 0.1])
    assert batch["scores"].tolist() == pytest.approx([0.8, 0.3, 0.5, 0.6, 0.1])
    assert batch["pair_symmetry_error"].tolist() == pytest.approx([0.2, 0.2, 0.0, 0.2, 0.0])
    assert ("G1", "G1") not in scorer.asked and len(scorer.asked) == 8  # 4 samples x 2 orders
    adv = compute_advantages(batch, _algo(), _ctx())["advantages"]
    assert adv[:, 0].tolist() == pytest.approx([0.3, -0.2, 0.0, 0.1, -0.4])
    assert adv[:, 1].tolist() == pytest.approx([0.3, -0.2, 0.0, 0.1, -0.4])  # the same on every token
    centred = compute_advantages(batch, _algo(), _ctx(center=True))["advantages"][:, 0]
    assert centred.tolist() == pytest.approx([0.8 / 3, -0.7 / 3, -0.1 / 3, 0.25, -0.25])


def test_a_batch_without_greedy_answers_is_its_own_anchor():
    """The greedy evaluation scores the greedy responses themselves: each is its own anchor, 1/2, nothing asked."""
    scorer = TableScorer({})
    src = PairwiseReward(scorer, anchor="greedy")
    values = src(Batch(meta={"prompt": ["p", "q"], "response": ["x", "y"], "group": [0, 1]}))
    assert values.tolist() == [0.5, 0.5] and scorer.asked == []


def test_greedy_anchors_follow_the_group_of_each_sample():
    """The rollout role decodes one greedy answer per prompt row; each sample gets its own prompt's answer even
    when the samples' order differs from the prompts'."""

    class FakeRollout:
        def __init__(self):
            self.calls = []

        def generate(self, prompts, greedy=False):
            self.calls.append(greedy)
            return Batch(meta={"group": list(prompts.meta["group"]), "response": ["g10", "g11"]})

    rollout = FakeRollout()
    prompts = Batch(meta={"prompt": ["p", "q"], "group": [10, 11]})
    samples = Batch(meta={"group": [11, 10, 10, 11]})
    assert greedy_anchors(rollout, prompts, samples).meta[GREEDY_ANCHOR] == ["g11", "g10", "g10", "g11"]
    assert rollout.calls == [True]


def test_greedy_anchor_refused_with_multi_turn_episodes():
    cfg = load_config(
        RLConfig,
        None,
        [
            "algo.name=pairwise_grpo",
            "reward.pairwise.model=x",
            "reward.pairwise.anchor=greedy",
            "rollout.n=2",
            "train.batch_size=8",
        ],
    )
    cfg.env.task = "dialogue"
    with pytest.raises(ConfigError, match="anchor=greedy"):
        resolve(cfg)


class Recording:
    """A pairwise scorer that prefers the longer response and records each question (first, second)."""

    def __init__(self):
        self.calls = []

    def ordered(self, prompts, firsts, seconds):
        self.calls.append(list(zip(prompts, firsts, seconds, strict=True)))
        p = [float(len(a) > len(b)) for a, b in zip(firsts, seconds, strict=True)]
        return torch.tensor(p, dtype=torch.float64), torch.zeros(len(firsts))

    @staticmethod
    def symmetrise(p_ab, p_ba):
        return 0.5 * (p_ab + 1.0 - p_ba)


def test_rl_run_compares_each_sample_with_its_prompts_greedy_answer(tmp_path, monkeypatch):
    """Two steps of the preset with anchor=greedy on the untrained task model: every question of a prompt has the
    same anchor, the anchor is asked in both orders, and the greedy evaluation's pairwise value is 1/2."""
    scorer = Recording()
    monkeypatch.setattr(rl_setup, "build_pairwise", lambda *a, **k: PairwiseReward(scorer, anchor="greedy"))
    cfg = load_config(
        RLConfig,
        "configs/pairwise_grpo.yaml",
        [
            "model.name_or_path=",
            "data.path=",
            "data.eval_path=",
            "reward.pairwise.anchor=greedy",
            "reward.pairwise.normalize=false",  # the preset scales group win rates; one anchor has none
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.progress=false",
            "rollout.prompts_per_step=4",
            "rollout.max_new_tokens=8",
            "rollout.eval_prompts=4",
            "train.batch_size=16",
            "train.eval_every=0",
            "task.num_sft=64",
            "task.num_pairs=64",
        ],
    )
    result = train_rl(cfg)
    calls = [c for c in scorer.calls if c]
    assert len(calls) == 2  # one call with questions per training step; the evaluation asks nothing
    for call in calls:
        shared: dict = {}  # per prompt: the responses that are in every one of its questions
        for prompt, first, second in call:
            shared[prompt] = shared.get(prompt, {first, second}) & {first, second}
            assert (prompt, second, first) in call  # both orders
        assert all(len(s) >= 1 for s in shared.values()), shared
    assert result.eval["eval/reward_pairwise_mean"] == 0.5
    assert "pairwise/win_rate_mean" in result.history[-1]
