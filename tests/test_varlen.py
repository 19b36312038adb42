"""Padding-free (varlen) rows: the flat forward equals running each sequence alone -- hidden states, log-probs,
NLL sums, reward scores and their gradients -- and every fast path equals the plain computation it replaces."""

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from alignflow.data.collate import flatten, pad_right, token_groups, unflatten
from alignflow.models import hidden_states, sequence_scores, token_logprobs
from alignflow.models.logprobs import masked_nll_sum
from alignflow.models.varlen import flat_hidden_states, flat_last_hidden, last_positions, supports_varlen

V = 50
LENS = [5, 9, 3, 6]


def llama(cls=LlamaForCausalLM, **kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=0,
        attn_implementation="sdpa",
        **kw,
    )
    return cls(cfg)


def seqs(lens=LENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lens]


def flat_ids(ss):
    return torch.tensor([t for s in ss for t in s])[None]  # (1, N)


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_flat_hidden_states_equal_separate_forwards_values_and_grads():
    """Each sequence's slice of the flat row equals that sequence run alone (GQA model: 4 query, 2 kv heads)."""
    model = llama()
    ss = seqs()
    flat = flat_hidden_states(model, flat_ids(ss), LENS)[0]  # (N, H)
    alone = torch.cat([hidden_states(model, torch.tensor([s]))[0] for s in ss])  # (N, H)
    torch.testing.assert_close(flat, alone, atol=1e-5, rtol=0)
    w = torch.randn_like(flat)
    (flat * w).sum().backward()
    g_flat = grads(model)
    model.zero_grad()
    (torch.cat([hidden_states(model, torch.tensor([s]))[0] for s in ss]) * w).sum().backward()
    torch.testing.assert_close(g_flat, grads(model), atol=1e-5, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # switched back after the call


def test_sliding_window_layers_keep_their_window():
    """Qwen2 with a 3-token window: a 9-token sequence must see only its window, flat or alone."""
    sizes = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(use_sliding_window=True, sliding_window=3, max_window_layers=0, **sizes)
    ).eval()
    no_window = Qwen2ForCausalLM(Qwen2Config(**sizes)).eval()
    no_window.load_state_dict(model.state_dict())
    ss = seqs()
    with torch.no_grad():
        flat = flat_hidden_states(model, flat_ids(ss), LENS)[0]
        alone = torch.cat([hidden_states(model, torch.tensor([s]))[0] for s in ss])
        unwindowed = hidden_states(no_window, torch.tensor([ss[1]]))[0]
    torch.testing.assert_close(flat, alone, atol=1e-5, rtol=0)
    assert (unwindowed - alone[5:14]).abs().max() > 1e-3  # the window really changes the 9-token sequence


def test_supports_varlen_refuses_what_it_cannot_compute_exactly():
    model = llama()
    assert supports_varlen(model)
    model.activation_checkpointing_enable()  # recomputation would run after the attention switch-back
    assert not supports_varlen(model)
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            head_dim=16,
        )
    )
    assert not supports_varlen(gemma)  # soft-capped attention: not in VARLEN_MODEL_TYPES
    with pytest.raises(ValueError, match="padding-free"):
        flat_hidden_states(gemma, flat_ids(seqs()), LENS)


def test_flat_last_hidden_equals_last_rows_of_full_forward():
    """The last layer computed at the n last rows only gives the same states and gradients as the full forward."""
    model = llama()
    ids = flat_ids(seqs())
    last = flat_last_hidden(model, ids, LENS)  # (n, H)
    (last**2).sum().backward()
    g_last = grads(model)
    model.zero_grad()
    full = flat_hidden_states(model, ids, LENS)[0, last_positions(LENS)]  # (n, H)
    (full**2).sum().backward()
    torch.testing.assert_close(last, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(g_last, grads(model), atol=1e-5, rtol=1e-4)
    layer = model.model.layers[-1]
    assert not layer.mlp._forward_hooks and not layer.mlp._forward_pre_hooks  # hooks removed


def test_sequence_scores_flat_equal_padded():
    model = llama(LlamaForSequenceClassification, num_labels=2)
    ss = seqs()
    padded = sequence_scores(model, pad_right(ss, 0), pad_right([[1] * len(s) for s in ss], 0))  # (4, 2)
    flat = sequence_scores(model, flat_ids(ss), None, seq_lens=LENS)
    torch.testing.assert_close(flat, padded, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [None, 3])
def test_masked_nll_sum_equals_masked_token_logprobs(chunk):
    """Padded rows and the same rows flat: -sum(logp * mask) from token_logprobs, values and grads; chunk=3 takes
    the chunked, checkpointed LM-head path."""
    model = llama()
    ss = seqs()
    masks = [[0, 0] + [1] * (n - 2) for n in LENS]  # a 2-token "prompt" out of the loss
    pad = {
        "input_ids": pad_right(ss, 0),
        "attention_mask": pad_right([[1] * n for n in LENS], 0),
        "loss_mask": pad_right(masks, 0),
    }
    logp, _ = token_logprobs(model, pad["input_ids"], pad["attention_mask"])
    ref = -(logp * pad["loss_mask"]).sum()
    ref.backward()
    g_ref = grads(model)
    flat = flatten([{"input_ids": s, "loss_mask": m} for s, m in zip(ss, masks, strict=False)])
    for mb in (pad, flat):
        model.zero_grad()
        got = masked_nll_sum(
            model,
            mb["input_ids"],
            mb["loss_mask"],
            attention_mask=mb.get("attention_mask"),
            position_ids=mb.get("position_ids"),
            seq_lens=mb.get("seq_lens"),
            chunk_size=chunk,
        )
        got.backward()
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(grads(model), g_ref, atol=1e-5, rtol=1e-4)


def test_token_logprobs_flat_rows_equal_separate_and_zero_at_sequence_starts():
    model = llama().eval()
    ss = seqs()
    with torch.no_grad():
        flat, ent = token_logprobs(model, flat_ids(ss), seq_lens=LENS, with_entropy=True)  # (1, N)
        alone = [token_logprobs(model, torch.tensor([s]), with_entropy=True) for s in ss]
    starts = [0, 5, 14, 17]
    assert flat[0, starts].abs().max() == 0  # nothing predicts the first token of a sequence
    torch.testing.assert_close(flat[0], torch.cat([a[0][0] for a in alone]), atol=1e-5, rtol=0)
    inner = [i for i in range(sum(LENS)) if i not in starts]
    torch.testing.assert_close(ent[0, inner], torch.cat([a[1][0, 1:] for a in alone]), atol=1e-5, rtol=0)


def test_flatten_unflatten_and_token_groups_hand_examples():
    ex = [{"input_ids": [7, 8, 9], "loss_mask": [0, 1, 1]}, {"input_ids": [4, 5], "loss_mask": [1, 1]}]
    f = flatten(ex)
    assert f["input_ids"].tolist() == [[7, 8, 9, 4, 5]]
    assert f["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert f["loss_mask"].tolist() == [[0, 1, 1, 1, 1]] and f["seq_lens"] == [3, 2]
    p = unflatten(f, pad_id=0)
    assert p["input_ids"].tolist() == [[7, 8, 9], [4, 5, 0]]
    assert p["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert p["loss_mask"].tolist() == [[0, 1, 1], [1, 1, 0]]
    # budget 10: 4+5 fit (9), 3 would make 12 -> new group; 12 alone exceeds it and still forms one group
    assert token_groups([4, 5, 3, 12, 2], budget=10) == [[0, 1], [2], [3], [4]]
    with pytest.raises(ValueError, match="no tokens"):
        flatten([{"input_ids": [], "loss_mask": []}])


@pytest.mark.parametrize("budget", [10_000, 20])
def test_bt_step_flat_equals_padded(budget):
    """Reward-model step: pairs in padding-free rows (one row, or a row per pair at budget 20) give the padded
    step's loss, metrics and gradients."""
    from alignflow.config import RMConfig, from_dict
    from alignflow.trainers.rm import bt_step

    ss = seqs([5, 9, 3, 6, 7, 4])
    pairs = [{"chosen_ids": ss[i], "rejected_ids": ss[i + 1], "margin": 0.5 * i} for i in (0, 2, 4)]
    out = []
    for packing in (False, True):
        cfg = from_dict(
            RMConfig, {"train": {"packing": packing, "micro_batch_tokens": budget, "mixed_precision": "none"}}
        )
        model = llama(LlamaForSequenceClassification, num_labels=1)
        metrics, tokens = bt_step(model, pairs, cfg, 0, torch.device("cpu"))
        out.append((metrics, tokens, grads(model)))
    (m0, t0, g0), (m1, t1, g1) = out
    assert t0 == t1 == sum(len(s) for s in ss)
    assert m1 == pytest.approx(m0, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-4)
