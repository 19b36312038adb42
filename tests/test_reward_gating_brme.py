"""ArmoRM gating when a multi-objective reward model scores RL rollouts, and BRME's reward-robust aggregation."""

import math

import pytest
import torch

from alignflow.algorithms.reward import aggregate, ensemble_brme
from alignflow.config import ConfigError, RLConfig, from_dict
from alignflow.models import GatingNetwork, last_token_hidden
from alignflow.rewards import CostModelScorer, RewardModelScorer
from alignflow.trainers.rl_setup import build_sources
from tests.test_rewards_model import PROMPTS, RESPONSES, alone, rollout_batch, tiny_rm


def test_brme_is_nominal_plus_worst_case_by_hand():
    """Members (1, 3, 2): mean 2, min 1. lambda = 0.25: 0.25 * 2 + 0.75 * 1 = 1.25; members (0, -4): mean -2,
    min -4, 0.25 * -2 + 0.75 * -4 = -3.5. lambda = 1 is the mean, lambda = 0 the minimum."""
    s = torch.tensor([[1.0, 3.0, 2.0], [0.0, -4.0, -4.0]])
    s[1] = torch.tensor([0.0, -4.0, -2.0])  # mean -2, min -4
    assert torch.allclose(ensemble_brme(s, 0.25), torch.tensor([1.25, -3.5]))
    assert torch.allclose(aggregate(s, "brme", 1.0), s.mean(-1))
    assert torch.allclose(aggregate(s, "brme", 0.0), s.min(-1).values)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ensemble_brme(s, 1.5)


def test_brme_scorer_uses_brme_lambda_and_is_pessimistic_for_a_cost():
    """Three heads: the reward scorer gives l * mean + (1 - l) * min; the cost scorer l * mean + (1 - l) * max."""
    model = tiny_rm(3, seed=0)
    batch = rollout_batch()
    rs = RewardModelScorer(model, aggregation="brme", uwo_lambda=0.9, brme_lambda=0.2)
    m = rs.member_scores(batch)  # (B, 3)
    assert torch.allclose(rs(batch), 0.2 * m.mean(-1) + 0.8 * m.min(-1).values, atol=1e-6)
    cs = CostModelScorer(model, aggregation="brme", brme_lambda=0.2)
    assert torch.allclose(cs(batch), 0.2 * m.mean(-1) + 0.8 * m.max(-1).values, atol=1e-6)
    with pytest.raises(ValueError, match="brme_lambda"):
        RewardModelScorer(model, aggregation="brme", brme_lambda=-0.1)


def _gated_dir(tmp_path, gate: GatingNetwork):
    model = tiny_rm(2, seed=3)
    model.save_pretrained(tmp_path / "armo")
    gate.save(tmp_path / "armo")
    return model, str(tmp_path / "armo")


def test_gated_model_is_one_member_weighted_by_the_gate_by_hand(tmp_path):
    """A gate with no hidden layer, zero weights and bias (T ln 3, 0) gives, whatever the prompt,
    softmax((T ln 3, 0) / T) = (3/4, 1/4) and scale 1, so R = 3/4 r_1 + 1/4 r_2 -- not the mean of the two
    attributes that the scorer used before, and one member (no ensemble spread)."""
    gate = GatingNetwork(32, 2, layers=0, temperature=10.0)
    with torch.no_grad():
        gate.mlp[0].weight.zero_()
        gate.mlp[0].bias.copy_(torch.tensor([10.0 * math.log(3.0), 0.0]))
    model, path = _gated_dir(tmp_path, gate)
    scorer = RewardModelScorer(path)
    assert scorer.num_members == 1
    batch = rollout_batch()
    attrs = torch.stack([alone(model, p + r) for p, r in zip(PROMPTS, RESPONSES, strict=True)])  # (B, 2)
    out, metrics = scorer.score(batch)
    assert torch.allclose(out, 0.75 * attrs[:, 0] + 0.25 * attrs[:, 1], atol=1e-5)
    assert not torch.allclose(out, attrs.mean(-1), atol=1e-3)
    assert "rollout/reward_model_member_std" not in metrics


def test_gate_reads_each_rows_prompt_whatever_the_padding(tmp_path):
    """A trained-like gate (random weights): the weights come from the prompt's last-token hidden state, as the
    trainer computes them, for left- and right-padded prompts alike."""
    torch.manual_seed(1)
    gate = GatingNetwork(32, 2, hidden=8, layers=1, temperature=1.0).eval()
    model, path = _gated_dir(tmp_path, gate)
    expected = []
    for p, r in zip(PROMPTS, RESPONSES, strict=True):
        ids = torch.tensor([p])
        with torch.no_grad():
            w = gate(last_token_hidden(model, ids, torch.ones_like(ids)))[0]  # (2,)
        expected.append((w * alone(model, p + r)).sum())
    scorer = RewardModelScorer(path)
    for padding in ("left", "right"):
        assert torch.allclose(scorer(rollout_batch(prompt_padding=padding)), torch.stack(expected), atol=1e-5)


def test_rl_config_reaches_brme_and_the_gate(tmp_path):
    """reward.aggregation=brme with reward.brme_lambda reaches the scorer; a bad value is a config error."""
    model = tiny_rm(3, seed=0)
    model.save_pretrained(tmp_path / "rm")
    cfg = from_dict(RLConfig, {"reward": {"models": [str(tmp_path / "rm")], "aggregation": "brme", "brme_lambda": 0.3}})
    comp = build_sources(cfg.reward, "reward", "reviews", cfg, torch.device("cpu"), 0)
    scorer = next(fn for _, fn, _ in comp.parts if isinstance(fn, RewardModelScorer))
    assert scorer.aggregation == "brme" and scorer.lam == 0.3
    with pytest.raises(ConfigError, match="brme_lambda"):
        from_dict(RLConfig, {"reward": {"brme_lambda": 2.0}})
