"""SAFE's double soft-min critic in `alignflow rl` (critic.double): the soft minimum by hand, GAE reading it, both
critics trained on the same returns, their checkpoints, and the config check."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.algorithms.advantages import ADVANTAGE_ESTIMATORS
from alignflow.algorithms.core import masked_whiten
from alignflow.algorithms.safe_control import soft_min
from alignflow.config import ConfigError
from alignflow.data.pipeline import prepare_data
from alignflow.trainers.double_critic import DoubleCritic, second_path
from alignflow.trainers.rl import _state, prepare
from alignflow.trainers.rl_algos import AdvContext, resolve, token_rewards
from alignflow.trainers.rl_setup import build_roles
from tests.test_online_rl import rl_cfg


def test_soft_min_with_safe_temperature_by_hand():
    """tau = 0.3, V1 = 0, V2 = 1: -0.3 (log(e^0 + e^(-1/0.3)) - log 2) = -0.3 (log(1 + 0.035674) - 0.693147)
    = -0.3 (0.035052 - 0.693147) = 0.197429: near the minimum 0, well below the mean 0.5. V1 = V2 = 2 gives 2.
    Large tau tends to the mean: expanding log cosh, V = mean - (V1 - V2)^2 / (8 tau) + O(tau^-3), so tau = 100
    gives 0.5 - 1/800 = 0.49875."""
    v = soft_min(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.0]), 0.3)
    assert v.tolist() == pytest.approx([0.197429, 2.0], abs=1e-6)
    assert soft_min(torch.tensor([0.0]), torch.tensor([1.0]), 100.0).item() == pytest.approx(0.49875, abs=1e-5)
    assert second_path("runs/x/checkpoints/critic-12").name == "critic_b-12"


def _double(task, out, **sections):
    sections = {"critic": {"double": True, "soft_min_tau": 0.3}, "kl": {"coef": 0.05}} | sections
    return rl_cfg(task, out, algo={"name": "ppo"}, rollout={"prompts_per_step": 3, "n": 1, "max_new_tokens": 6},
                  train={"batch_size": 3}, **sections)  # fmt: skip


def test_gae_reads_the_soft_min_of_two_different_critics(reviews_task, tmp_path):
    """One rollout through the controller's own ``prepare``: the two critics start from different value heads, so
    their values differ; the ``values`` GAE reads are soft_min(V1, V2, 0.3) token by token; the advantages are GAE
    (gamma 1, lambda 0.95, whitened) on those values and not on either critic's alone. Then one update trains both
    on the same returns, and a checkpoint round trip restores both."""
    cfg = _double(reviews_task, tmp_path / "run")
    algo = resolve(cfg)
    roles = build_roles(cfg, algo, torch.device("cpu"), 1)
    assert isinstance(roles.critic.role, DoubleCritic)
    rows = prepare_data(cfg.data, roles.tokenizer, expect=("prompt",)).train
    st = _state(cfg, algo, rows)
    batch = roles.rollout.generate(st.prompts.take(3))
    batch = prepare(roles, batch.union(roles.reward.score(batch)), st, cfg, algo)
    mask = batch["response_mask"].bool()
    v1, v2 = batch["values_1"], batch["values_2"]
    assert (v1 - v2)[mask].abs().min() > 1e-4  # different initialisations
    assert torch.allclose(batch["values"][mask], soft_min(v1, v2, 0.3)[mask], atol=1e-6)
    assert bool((batch["values"][mask] < torch.maximum(v1, v2)[mask]).all())

    ctx = AdvContext(beta=st.kl.value, estimator="k1", gamma=1.0, lam=0.95, whiten=True, reinforce_pp_baseline=False)
    rewards = token_rewards(batch, ctx, batch["scores"])

    def gae(values):
        adv, ret = ADVANTAGE_ESTIMATORS["gae"](rewards, values, batch["response_mask"], 1.0, 0.95)
        return masked_whiten(adv, batch["response_mask"]), ret

    adv, ret = gae(batch["values"])
    assert torch.allclose(batch["advantages"], adv, atol=1e-5) and torch.allclose(batch["returns"], ret, atol=1e-5)
    assert not torch.allclose(batch["returns"], gae(v1)[1], atol=1e-3)  # not the first critic's GAE

    before = [
        p.detach().clone() for p in (roles.critic.first.model.score.weight, roles.critic.second.model.score.weight)
    ]
    m = roles.critic.update(batch)
    assert math.isfinite(m["critic/value_loss"]) and math.isfinite(m["critic2/value_loss"])
    after = (roles.critic.first.model.score.weight, roles.critic.second.model.score.weight)
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))

    ckpt = tmp_path / "checkpoints" / "critic-1"
    roles.critic.save(ckpt)
    assert (tmp_path / "checkpoints" / "critic_b-1" / "trainer_state.json").is_file()
    fresh = build_roles(cfg, algo, torch.device("cpu"), 1)
    fresh.critic.load(ckpt)
    again = fresh.critic.values(batch)
    assert torch.allclose(again["values"], roles.critic.values(batch)["values"], atol=1e-6)


def test_double_critic_needs_a_critic(reviews_task, tmp_path):
    with pytest.raises(ConfigError, match="critic.double: algo.name=grpo has no critic"):
        resolve(rl_cfg(reviews_task, tmp_path, algo={"name": "grpo"}, critic={"double": True}))
    with pytest.raises(ConfigError, match="critic.soft_min_tau"):
        _double(reviews_task, tmp_path, critic={"double": True, "soft_min_tau": 0.0})
