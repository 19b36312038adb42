"""Think-RM's scale of the pairwise win-rate advantage (``reward.pairwise.normalize``): hand-derived values, the
identity with GRPO's z-score, invariance to how decisive the scorer is, the advantage step and the load-time rule."""

import pytest
import torch

from alignflow.algorithms.pairwise_adv import normalized_win_rate_advantages
from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig, load_config
from alignflow.trainers.rl_algos import AdvContext, compute_advantages, resolve


def _pref(r, scale=1.0):
    r = torch.tensor(r, dtype=torch.float64)
    return 0.5 + scale * (r[:, None] - r[None, :])


def test_margins_from_scores_give_grpos_z_score():
    """r = (0.2, 0, -0.2), P = 1/2 + r_i - r_j: d_12 = 0.2, d_13 = 0.4, d_23 = 0.2. Row sums 0.6, 0, -0.6, over G = 3:
    0.2, 0, -0.2. Σ_{i,j} d² = 2 (0.04 + 0.16 + 0.04) = 0.48, / (2·3·2) = 0.04, sqrt 0.2. A = (1, 0, -1), which is
    GRPO's (r - mean) / std with the unbiased std sqrt((0.04 + 0 + 0.04) / 2) = 0.2."""
    a = normalized_win_rate_advantages(_pref([0.2, 0.0, -0.2]), eps=0.0)
    assert a.tolist() == pytest.approx([1.0, 0.0, -1.0])


def test_a_barely_decisive_scorer_gives_the_same_advantages():
    """Margins 20x smaller (P within 0.5 ± 0.02) give the same scaled advantages; the raw win rate - 1/2 would be
    20x smaller. Four samples r = (0.3, 0.1, 0, -0.4): mean 0, unbiased var (0.09 + 0.01 + 0 + 0.16)/3 = 0.26/3."""
    r = [0.3, 0.1, 0.0, -0.4]
    strong = normalized_win_rate_advantages(_pref(r), eps=0.0)
    weak = normalized_win_rate_advantages(_pref(r, scale=0.05), eps=0.0)
    std = (0.26 / 3) ** 0.5
    assert strong.tolist() == pytest.approx([x / std for x in r])
    assert weak.tolist() == pytest.approx(strong.tolist())
    assert normalized_win_rate_advantages(torch.full((2, 3, 3), 0.5)).tolist() == [[0.0] * 3] * 2  # indifferent


def _cfg(*over):
    base = ["algo.name=pairwise_grpo", "reward.pairwise.model=pm-dir", "rollout.n=2", "train.batch_size=8"]
    return load_config(RLConfig, None, base + list(over))


def test_the_advantage_step_scales_when_asked():
    """One group of three with the matrix above, through the pairwise step: (1, 0, -1) scaled, (0.3, 0, -0.3) raw
    (win rates (0.7 + 0.9)/2 = 0.8, 0.5, 0.2, minus 1/2)."""
    pref = _pref([0.2, 0.0, -0.2]).float()
    batch = Batch(
        {
            "response_mask": torch.ones(3, 2),
            "old_logprobs": torch.zeros(3, 2),
            "pair_prefs": pref,
            "pair_group_size": torch.full((3,), 3.0),
            "group": torch.tensor([5, 5, 5]),
        }
    )
    algo = resolve(_cfg("reward.pairwise.normalize=true"))
    ctx = dict(beta=0.0, estimator="k3", gamma=1.0, lam=1.0, whiten=False, reinforce_pp_baseline=False)
    scaled = compute_advantages(batch, algo, AdvContext(**ctx, pairwise_normalize=True))["advantages"]
    raw = compute_advantages(batch, algo, AdvContext(**ctx))["advantages"]
    assert scaled[:, 0].tolist() == pytest.approx([1.0, 0.0, -1.0], abs=1e-4)
    assert raw[:, 1].tolist() == pytest.approx([0.3, 0.0, -0.3], abs=1e-6)


def test_normalize_needs_the_group_anchor():
    with pytest.raises(ConfigError, match="reward.pairwise.normalize"):
        resolve(_cfg("reward.pairwise.normalize=true", "reward.pairwise.anchor=reference"))
