"""The seq2seq reward model in PPO: token rewards from a rewrite reach the per-token reward tensor of the PPO
batch (and GAE's returns) at the edited tokens; a response the rewriter keeps gets none. Hand-derived."""

import pytest
import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig, load_config
from alignflow.rewards import CompositeReward
from alignflow.rewards.seq2seq import Seq2SeqReward, build_seq2seq
from alignflow.tasks.reviews_rewrite import rewrite_prompt
from alignflow.trainers.rl_algos import AdvContext, compute_advantages, resolve, token_rewards
from alignflow.trainers.roles import RewardRole

VOCAB = ["<pad>", "<eos>", "the", "plot", "was", "dull", ".", "a", "b", "Review", ":"]


class WordTok:
    """Word-level tokenizer: one id per vocabulary word, EOS id 1."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [VOCAB.index(w) for w in text.split()]})()


class TableRewriter:
    """Rewrites by table: the rewriter's input text -> its rewrite; records what it was asked."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def rewrite(self, texts):
        self.asked += texts
        return [self.table[t] for t in texts]


def _ppo_batch():
    """Row 0 "the plot was dull dull" + EOS, row 1 "a b ." + EOS (then padding), response width 6."""
    tok = WordTok()
    rows = [tok(" the plot was dull dull").input_ids + [1], tok(" a b .").input_ids + [1]]
    ids, mask = torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1.0
    meta = {"prompt": ["Review :", "Review :"], "response": [" the plot was dull dull", " a b ."], "group": [0, 1]}
    return Batch({"response_ids": ids, "response_mask": mask, "old_logprobs": torch.zeros(2, 6)}, meta)


def test_kept_response_gets_zero_and_edited_tokens_get_the_hand_computed_rewards_in_the_ppo_batch():
    """Row 0's rewrite "the plot was dull ." replaces the second "dull" (-1, times the source weight 2 = -2) and
    keeps the rest (0); its EOS gets 0. Row 1's rewrite is itself: all zeros. The sequence values are the sums
    (-2, 0). With β = 0 the PPO per-token reward is r_t = T_t + 1[t = last](R - Σ T) = T_t, so row 0's rewards
    are [0, 0, 0, 0, -2, 0]; GAE with γ = λ = 1 and zero values gives returns = suffix sums [-2]*5 + [0]."""
    rewriter = TableRewriter(
        {
            rewrite_prompt("Review :", " the plot was dull dull"): " the plot was dull .",
            rewrite_prompt("Review :", " a b ."): " a b .",
        }
    )
    src = Seq2SeqReward(rewriter, WordTok())
    batch = _ppo_batch()
    batch = batch.union(RewardRole(CompositeReward([("seq2seq", src, 2.0)])).score(batch))
    assert batch["scores"].tolist() == [-2.0, 0.0]
    assert batch["token_scores"].tolist() == [[0, 0, 0, 0, -2, 0], [0] * 6]
    ctx = AdvContext(beta=0.0, estimator="k1", gamma=1.0, lam=1.0, whiten=False, reinforce_pp_baseline=False)
    rewards = token_rewards(batch, ctx, batch["scores"])
    assert rewards.tolist() == [[0, 0, 0, 0, -2, 0], [0] * 6]
    algo = resolve(load_config(RLConfig, None, ["algo.name=ppo"]))
    batch["values"] = torch.zeros(2, 6)
    out = compute_advantages(batch, algo, ctx)
    assert out["returns"][0].tolist() == [-2, -2, -2, -2, -2, 0]
    assert out["returns"][1].tolist() == [0] * 6
    src(batch)  # a second call is served from the cache
    assert len(rewriter.asked) == 2


def test_token_rewards_add_up_with_a_sequence_reward_and_the_kl():
    """Another source's sequence reward (here 1.5) stays on the last response token; the token rewards sit on
    theirs: R = 1.5 - 2 = -0.5, r_4 = -2, r_5 (last, the EOS) = R - Σ T = -0.5 + 2 = 1.5; with β = 0.5 and
    k1 = lp_old - lp_ref = 0.2 on every token each token also gets -0.1."""
    rewriter = TableRewriter({rewrite_prompt("Review :", " the plot was dull dull"): " the plot was dull ."})
    batch = _ppo_batch().select([0])
    role = RewardRole(CompositeReward([("seq2seq", Seq2SeqReward(rewriter, WordTok()), 2.0), ("c", _const, 1.0)]))
    batch = batch.union(role.score(batch))
    batch["ref_logprobs"] = torch.full((1, 6), -0.2)
    ctx = AdvContext(beta=0.5, estimator="k1", gamma=1.0, lam=1.0, whiten=False, reinforce_pp_baseline=False)
    assert token_rewards(batch, ctx, batch["scores"])[0].tolist() == pytest.approx([-0.1] * 4 + [-2.1, 1.4])


def _const(batch):
    return torch.full((len(batch),), 1.5)


def test_token_rewards_refuse_normalisation():
    cfg = load_config(RLConfig, None, ["reward.seq2seq.model=x", "reward.normalize=running"])
    with pytest.raises(ConfigError, match="reward.seq2seq: .*reward.normalize=none"):
        build_seq2seq(cfg.reward.seq2seq, cfg)
