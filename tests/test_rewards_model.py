"""Reward-model scorers: ensembles (heads or models) aggregate like ``aggregate``; rows are re-packed without
padding."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignflow.algorithms.reward import aggregate
from alignflow.batch import Batch
from alignflow.models import sequence_scores
from alignflow.rewards import CompositeReward, CostModelScorer, RewardModelScorer, packed_sequences

VOCAB, PAD = 40, 0
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12]]
RESPONSES = [[13, 14], [15, 16, 17, 18], [19]]


def tiny_rm(num_labels: int, seed: int) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=PAD,
    )
    return LlamaForSequenceClassification(cfg).eval()


def rollout_batch(prompts=PROMPTS, responses=RESPONSES, prompt_padding: str = "left") -> Batch:
    """Laid out like the rollout engine's output: left-padded prompts, right-padded responses.
    ``prompt_padding="right"`` puts the prompt's padding between prompt and response (a gap)."""
    tp, tr = max(map(len, prompts)), max(map(len, responses))
    left = prompt_padding == "left"
    p_ids = torch.tensor([[PAD] * (tp - len(p)) + p if left else p + [PAD] * (tp - len(p)) for p in prompts])
    p_mask = torch.tensor(
        [[0] * (tp - len(p)) + [1] * len(p) if left else [1] * len(p) + [0] * (tp - len(p)) for p in prompts]
    )  # (B, Tp)
    r_ids = torch.tensor([r + [PAD] * (tr - len(r)) for r in responses])  # (B, Tr)
    r_mask = torch.tensor([[1] * len(r) + [0] * (tr - len(r)) for r in responses])
    return Batch(
        {
            "prompt_ids": p_ids,
            "prompt_mask": p_mask,
            "response_ids": r_ids,
            "response_mask": r_mask,
            "input_ids": torch.cat([p_ids, r_ids], 1),
            "attention_mask": torch.cat([p_mask, r_mask], 1),
        },
        {"prompt": ["p"] * len(prompts), "response": ["r"] * len(prompts)},
    )


def alone(model, seq) -> torch.Tensor:
    """Scores (K,) of one unpadded sequence, scored on its own."""
    ids = torch.tensor([seq])  # (1, T)
    with torch.no_grad():
        return sequence_scores(model, ids, torch.ones_like(ids))[0]


@pytest.fixture(scope="module")
def three_heads():
    return tiny_rm(3, seed=0)


@pytest.mark.parametrize("prompt_padding", ["left", "right"])
def test_repacking_removes_the_padding(three_heads, prompt_padding):
    """Whatever the padding (left of the prompt, right of the response, or a gap between prompt and response
    when the prompt is right-padded), each row is packed as exactly prompt + response and scores as that
    unpadded sequence scored alone."""
    batch = rollout_batch(prompt_padding=prompt_padding)
    assert packed_sequences(batch) == [p + r for p, r in zip(PROMPTS, RESPONSES, strict=False)]
    members = RewardModelScorer(three_heads).member_scores(batch)  # (B, 3)
    expected = torch.stack([alone(three_heads, p + r) for p, r in zip(PROMPTS, RESPONSES, strict=False)])
    assert members.shape == (3, 3)
    assert torch.allclose(members, expected, atol=1e-5)


def test_a_padding_gap_would_change_the_score(three_heads):
    """Sanity check of the test above: the row with a gap, scored with the gap's pad tokens as real tokens,
    does NOT give the unpadded score -- so the re-packing is what makes the scores equal."""
    gapped = torch.tensor([PROMPTS[1] + [PAD] + RESPONSES[1]])  # (1, T): prompt, a pad, response
    with torch.no_grad():
        naive = sequence_scores(three_heads, gapped, torch.ones_like(gapped))[0]
    assert not torch.allclose(naive, alone(three_heads, PROMPTS[1] + RESPONSES[1]), atol=1e-4)


def test_fallback_on_input_ids_and_attention_mask(three_heads):
    full = rollout_batch()
    only = Batch({"input_ids": full["input_ids"], "attention_mask": full["attention_mask"]})
    scorer = RewardModelScorer(three_heads)
    assert torch.allclose(scorer.member_scores(only), scorer.member_scores(full), atol=1e-6)
    with pytest.raises(KeyError, match="prompt_ids"):
        scorer.member_scores(Batch(meta={"prompt": ["a"]}))


@pytest.mark.parametrize("mode", ["mean", "min", "uwo"])
def test_heads_ensemble_aggregates_like_aggregate(three_heads, mode):
    batch = rollout_batch()
    scorer = RewardModelScorer(three_heads, aggregation=mode, uwo_lambda=0.3)
    members = scorer.member_scores(batch)
    out, metrics = scorer.score(batch)
    assert torch.allclose(out, aggregate(members, mode, 0.3))
    assert torch.equal(scorer.last_member_scores, members)
    assert torch.allclose(scorer(batch), out)
    assert metrics["rollout/reward_model_member_std"] == pytest.approx(members.std(-1, unbiased=False).mean().item())


def test_models_ensemble_has_one_member_per_model(tmp_path):
    """Three one-output models saved to disk and loaded by path: member i == model i alone."""
    models = [tiny_rm(1, seed=s) for s in (1, 2, 3)]
    paths = []
    for i, m in enumerate(models):
        m.save_pretrained(tmp_path / f"member-{i}")
        paths.append(str(tmp_path / f"member-{i}"))
    scorer = RewardModelScorer(paths, aggregation="min")
    assert scorer.num_members == 3
    batch = rollout_batch()
    members = scorer.member_scores(batch)
    expected = torch.stack(
        [torch.cat([alone(m, p + r) for m in models]) for p, r in zip(PROMPTS, RESPONSES, strict=False)]
    )
    assert torch.allclose(members, expected, atol=1e-5)
    assert torch.allclose(scorer(batch), expected.min(-1).values, atol=1e-5)


def test_cost_aggregation_is_pessimistic(three_heads):
    """Costs (1.0, 1.2, 2.6), lambda 0.5 (the example of docs/reward_models.md): mean 1.6, population variance
    ((-0.6)^2 + (-0.4)^2 + 1.0^2) / 3 = 1.52 / 3 = 0.5066667. Reward side: min 1.0, uwo 1.6 - 0.2533 = 1.3466667.
    Cost side: worst case is the LARGEST cost 2.6 and uwo ADDS the penalty: 1.6 + 0.2533333 = 1.8533333."""
    c = torch.tensor([[1.0, 1.2, 2.6]])
    expect = {"mean": (1.6, 1.6), "min": (1.0, 2.6), "uwo": (1.3466667, 1.8533333)}
    for mode, (as_reward, as_cost) in expect.items():
        assert RewardModelScorer(three_heads, aggregation=mode).aggregate(c).item() == pytest.approx(as_reward)
        assert CostModelScorer(three_heads, aggregation=mode).aggregate(c).item() == pytest.approx(as_cost)


def test_bad_inputs_are_named(three_heads):
    with pytest.raises(ValueError, match="aggregation='max' is not one of mean, min, uwo"):
        RewardModelScorer(three_heads, aggregation="max")
    out_of_vocab = rollout_batch(prompts=[[5, 6], [7, VOCAB + 3]], responses=[[8], [9]])
    with pytest.raises(ValueError, match=r"row 1 has token ids outside the reward model's vocabulary \[0, 40\)"):
        RewardModelScorer(three_heads)(out_of_vocab)
    empty = rollout_batch(prompts=[[5], [6]], responses=[[7], [8]])
    empty.tensors["prompt_mask"][1] = 0
    empty.tensors["response_mask"][1] = 0
    with pytest.raises(ValueError, match="row 1 of the batch has no tokens"):
        RewardModelScorer(three_heads)(empty)


def test_scorer_composes_with_rule_rewards(three_heads):
    batch = rollout_batch()
    scorer = RewardModelScorer(three_heads, name="rm")
    total, metrics = CompositeReward([(scorer, 2.0), ("bonus", lambda b: torch.ones(len(b)), 1.0)]).score(batch)
    assert torch.allclose(total, 2 * scorer(batch) + 1)
    assert set(metrics) == {
        "rollout/reward_rm_mean",
        "rollout/reward_bonus_mean",
        "rollout/reward_mean",
        "reward/errors",
        "reward/timeouts",
        "reward/nonfinite",
    }
    assert metrics["reward/errors"] == metrics["reward/timeouts"] == metrics["reward/nonfinite"] == 0.0
