"""MA-RLHF (algo.name=ma_ppo): termination rules and macro-level GAE by hand, n = 1 is token-level GAE, the config
keys, and a short learning run on the reviews task (gold reward of held-out samples rises)."""

from __future__ import annotations

import pytest
import torch

from alignflow.algorithms.advantages import gae
from alignflow.algorithms.macro import (
    fixed_ngram_macros,
    macro_gae,
    macro_weights,
    perplexity_macros,
    random_ngram_macros,
)
from alignflow.config import ConfigError
from alignflow.models import load_causal_lm
from alignflow.trainers.rl import train_rl
from alignflow.trainers.rl_algos import resolve
from tests.test_online_rl import rl_cfg
from tests.test_seed_methods_learning import COMMON, _gold


def test_fixed_ngram_with_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    assert fixed_ngram_macros(mask, 2).tolist() == [[0, 0, 1, 1, 2, -1], [-1, -1, 0, 0, 1, 1]]
    assert fixed_ngram_macros(mask, 1)[0].tolist() == [0, 1, 2, 3, 4, -1]


def test_random_ngram_draws_the_multiset_in_some_order():
    """lengths {1, 2}, one copy, 5 tokens: order (1, 2) cuts after tokens 1 and 3 -> [0, 1, 1, 2, 2]; order (2, 1)
    cuts after 2 and 3 -> [0, 0, 1, 2, 2] (the tokens after the drawn spans are one final macro)."""
    mask = torch.ones(1, 5)
    seen = {
        tuple(random_ngram_macros(mask, [1, 2], 1, torch.Generator().manual_seed(s))[0].tolist()) for s in range(20)
    }
    assert seen == {(0, 1, 1, 2, 2), (0, 0, 1, 2, 2)}


def test_perplexity_rule_opens_a_macro_where_nll_rises():
    """nll = (1, 2, 0.5, 0.7, 3): it rises at tokens 1, 3 and 4, so macros start there: [0, 1, 1, 2, 3]."""
    lp = torch.tensor([[-1.0, -2.0, -0.5, -0.7, -3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert perplexity_macros(lp, mask).tolist() == [[0, 1, 1, 2, 3, -1]]


def test_macro_gae_by_hand():
    """Two macros of 2 tokens, r = (0, 0, 0, 1), V = (0.2, 0.4, 0.6, 0.8), gamma 1, lambda 0.5.

    equal: V(w1) = 0.3, V(w2) = 0.7; delta_2 = 1 - 0.7 = 0.3 = A_2; delta_1 = 0 + 0.7 - 0.3 = 0.4,
           A_1 = 0.4 + 0.5 * 0.3 = 0.55; returns G_1 = 0.55 + 0.3 = 0.85, G_2 = 0.3 + 0.7 = 1.0.
    unit:  V(w1) = 0.4, V(w2) = 0.8; A_2 = 0.2, A_1 = 0.4 + 0.5 * 0.2 = 0.5; G = (0.9, 1.0).
    position: weights (2/3, 1/3) inside each macro: V(w1) = 0.8/3, V(w2) = 2/3; A_2 = 1/3,
           A_1 = (2/3 - 0.8/3) + 0.5 / 3 = 0.5667.
    """
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    v = torch.tensor([[0.2, 0.4, 0.6, 0.8]])
    mask = torch.ones(1, 4)
    ids = fixed_ngram_macros(mask, 2)
    adv, ret = macro_gae(r, v, mask, ids, 1.0, 0.5, "equal")
    assert adv[0].tolist() == pytest.approx([0.55, 0.55, 0.3, 0.3])
    assert ret[0].tolist() == pytest.approx([0.85, 0.85, 1.0, 1.0])
    adv, ret = macro_gae(r, v, mask, ids, 1.0, 0.5, "unit")
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.2, 0.2])
    assert ret[0].tolist() == pytest.approx([0.9, 0.9, 1.0, 1.0])
    adv, _ = macro_gae(r, v, mask, ids, 1.0, 0.5, "position")
    assert adv[0].tolist() == pytest.approx([0.56667, 0.56667, 1 / 3, 1 / 3], abs=1e-5)
    assert macro_weights(ids, mask, "position")[0].tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3, 1 / 3])


def test_one_token_macros_are_token_level_gae():
    """With n = 1 every macro is a token, so macro GAE must equal token GAE exactly (left padding, interior gap)."""
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0, 0]])
    for w in ("equal", "unit", "position"):
        adv, ret = macro_gae(r, v, mask, fixed_ngram_macros(mask, 1), 0.9, 0.8, w)
        ref_adv, ref_ret = gae(r, v, mask, 0.9, 0.8)
        assert torch.allclose(adv, ref_adv, atol=1e-6) and torch.allclose(ret, ref_ret, atol=1e-6)


def test_macro_keys_are_checked(reviews_task, tmp_path):
    with pytest.raises(ConfigError, match="algo.macro.rule"):
        rl_cfg(reviews_task, tmp_path, algo={"name": "ma_ppo", "macro": {"rule": "constituency"}})
    with pytest.raises(ConfigError, match="needs a critic"):
        resolve(rl_cfg(reviews_task, tmp_path, algo={"name": "grpo", "advantage": "macro_gae"}))
    assert resolve(rl_cfg(reviews_task, tmp_path, algo={"name": "ma_ppo"})).advantage == "macro_gae"


def test_ma_ppo_raises_gold_reward(reviews_task, reviews_sft, tmp_path):
    """ma_ppo (fixed 3-gram macros) for 6 steps of 16 prompts raises the mean gold reward of held-out samples
    (measured: -2.13 -> -1.53)."""
    before = _gold(reviews_task, load_causal_lm(rl_cfg(reviews_task, tmp_path, reviews_sft).model))
    cfg = rl_cfg(
        reviews_task,
        tmp_path / "ma",
        reviews_sft,
        algo={"name": "ma_ppo", "ppo_epochs": 2, "macro": {"rule": "fixed", "n": 3}},
        rollout={"prompts_per_step": 16, "n": 1, "max_new_tokens": 24},
        train={"batch_size": 8, "max_steps": 6},
        **COMMON,
    )
    result = train_rl(cfg)
    after = _gold(reviews_task, result.model)
    assert 2.0 < result.history[-1]["macro/mean_len"] <= 3.0
    assert after > before + 0.3, (before, after)
