"""Packing and micro-batching: bins respect capacity, masks keep samples apart, packed loss == unpacked loss."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignflow.data.collate import block_causal_mask, first_fit_decreasing, pack, pad_batch, token_budget_groups


def test_first_fit_decreasing_respects_capacity_and_keeps_every_item():
    lengths = [7, 3, 5, 2, 8, 1, 4]
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 30 tokens in bins of 10 fit exactly: 8+2, 7+3, 5+4+1


def test_oversized_item_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([11], 10)


def test_block_causal_mask_hand_example():
    """Segments [0, 0, 1, -1]: token 2 (segment 1) sees only itself; padding sees only itself."""
    m = block_causal_mask(torch.tensor([[0, 0, 1, -1]]))[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_token_budget_groups():
    groups = token_budget_groups([2, 9, 3, 8], budget=16)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    lengths = [2, 9, 3, 8]
    assert all(len(g) * max(lengths[i] for i in g) <= 16 for g in groups if len(g) > 1)


def test_packed_logits_equal_separate_forwards():
    """The decisive packing test: samples packed in one row give the logits they get alone."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            attn_implementation="sdpa",
        )
    ).eval()
    seqs = [torch.randint(1, 40, (n,)).tolist() for n in (5, 9, 3, 6)]
    examples = [{"input_ids": s, "loss_mask": [1] * len(s)} for s in seqs]
    packed = pack(examples, capacity=12, pad_id=0)
    with torch.no_grad():
        logits = model(
            packed["input_ids"], attention_mask=packed["attention_mask"], position_ids=packed["position_ids"]
        ).logits  # (B, T, V)
        for row in range(packed["input_ids"].shape[0]):
            for seg in packed["segment_ids"][row].unique().tolist():
                if seg < 0:
                    continue
                where = (packed["segment_ids"][row] == seg).nonzero().squeeze(-1)
                ids = packed["input_ids"][row, where]
                alone = model(ids[None]).logits[0]
                assert torch.allclose(logits[row, where], alone, atol=1e-5)


def test_pad_batch_shapes_and_masks():
    b = pad_batch([{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}, {"input_ids": [4], "loss_mask": [1]}], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
