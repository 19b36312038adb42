"""token_logprobs: the chunked, checkpointed computation equals the naive full-logits one (values, entropy, grads)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from alignflow.models import token_logprobs

V = 64


def tiny_llama(seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=0,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def naive(model, ids, mask=None, pos=None, temperature=1.0, labels=None):
    """The reference: full logits, log_softmax, gather the next token; position 0 gets 0 (our convention)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float() / temperature  # (B, T, V)
    lp = torch.log_softmax(logits[:, :-1], -1)  # (B, T-1, V)
    tgt = (ids if labels is None else labels)[:, 1:]
    logp = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt != -100)  # (B, T-1)
    ent = -(lp.exp() * lp).sum(-1)  # (B, T-1)
    zero = torch.zeros(ids.shape[0], 1)
    return torch.cat([zero, logp], 1), torch.cat([zero, ent], 1)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (3, 10), generator=g)  # (B, T) with T = 10: T-1 = 9 predicted positions
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_values_entropy_and_grads_equal_naive(data, chunk):
    """Chunk sizes of 1, 4 (does not divide T-1 = 9) and above T give the naive values and gradients."""
    ids, mask, pos = data
    model = tiny_llama()
    logp, ent = token_logprobs(model, ids, mask, chunk_size=chunk, with_entropy=True)
    ref_lp, ref_ent = naive(model, ids, mask, pos)
    real = mask.bool()
    assert logp.shape == ent.shape == ids.shape and logp.dtype == torch.float32
    assert torch.all(logp[:, 0] == 0) and torch.all(ent[:, 0] == 0)
    torch.testing.assert_close(logp[real], ref_lp[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[real], ref_ent[real], atol=1e-5, rtol=0)

    loss = -(logp * mask).sum() - 0.1 * (ent * mask).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_lp, ref_ent = naive(model, ids, mask, pos)
    ref_loss = -(ref_lp * mask).sum() - 0.1 * (ref_ent * mask).sum()
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    for a, b in zip(grads, ref_grads, strict=False):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_chunking_does_not_change_results(data):
    ids, mask, _ = data
    model = tiny_llama()
    with torch.no_grad():
        outs = [token_logprobs(model, ids, mask, chunk_size=c, with_entropy=True) for c in (2, 5, 100)]
    for lp, ent in outs[1:]:
        torch.testing.assert_close(lp, outs[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(ent, outs[0][1], atol=1e-6, rtol=0)
    assert outs[0][0].requires_grad is False


def test_labels_and_temperature(data):
    """labels=input_ids is the default; -100 labels give 0; other labels are gathered at the same positions;
    temperature divides the logits before the softmax."""
    ids, mask, pos = data
    model = tiny_llama()
    with torch.no_grad():
        base, none_ent = token_logprobs(model, ids, mask)
        assert none_ent is None
        torch.testing.assert_close(token_logprobs(model, ids, mask, labels=ids.clone())[0], base)
        labels = (ids + 5) % V
        labels[:, :3] = -100
        lp, _ = token_logprobs(model, ids, mask, labels=labels, chunk_size=3)
        ref, _ = naive(model, ids, mask, pos, labels=labels)
        assert torch.all(lp[:, :3] == 0)
        torch.testing.assert_close(lp[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
        lp, _ = token_logprobs(model, ids, mask, temperature=0.7, chunk_size=4)
        ref, _ = naive(model, ids, mask, pos, temperature=0.7)
        torch.testing.assert_close(lp[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)


def test_left_padding_matches_unpadded():
    """Without position_ids they come from the mask, so a left-padded row scores like the unpadded sequence."""
    model = tiny_llama()
    seq = torch.tensor([[5, 9, 13, 2, 40]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)  # (1, 8)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a, _ = token_logprobs(model, seq)
        b, _ = token_logprobs(model, padded, mask)
    torch.testing.assert_close(b[:, 4:], a[:, 1:], atol=1e-5, rtol=0)  # the first real token has no context


def test_tied_lm_head_values_and_grads(data):
    ids, mask, pos = data
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    logp, _ = token_logprobs(model, ids, mask, chunk_size=4)
    ref, _ = naive(model, ids, mask, pos)
    torch.testing.assert_close(logp[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    (g,) = torch.autograd.grad((logp * mask).sum(), [model.lm_head.weight])
    (rg,) = torch.autograd.grad((ref * mask).sum(), [model.lm_head.weight])
    torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-4)


def test_lora_wrapped_model(data):
    """Through a peft wrapper the adapters are used (non-zero B changes the result) and match the naive path."""
    ids, mask, pos = data
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        before, _ = token_logprobs(model, ids, mask)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    logp, _ = token_logprobs(model, ids, mask, chunk_size=4)
    ref, _ = naive(model, ids, mask, pos)
    real = mask.bool()
    assert (logp[real] - before[real]).abs().max() > 1e-3
    torch.testing.assert_close(logp[real], ref[real], atol=1e-5, rtol=0)
    (logp * mask).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    with model.disable_adapter(), torch.no_grad():
        off, _ = token_logprobs(model, ids, mask)
    torch.testing.assert_close(off[real], before[real], atol=1e-6, rtol=0)


def test_packed_rows_equal_separate_forwards():
    """Two samples packed in one row with a block-diagonal causal (B,1,T,T) mask and restarting positions give,
    inside each sample, the log-probs of running that sample alone (the boundary token is not compared: it is
    'predicted' from the previous sample and a loss mask drops it)."""
    model = tiny_llama()
    a, b = torch.tensor([[3, 8, 21, 7, 9]]), torch.tensor([[11, 4, 30, 2]])
    packed = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], 1)  # (1, 11): a | b | 2 pads
    seg = torch.tensor([[0] * 5 + [1] * 4 + [2] * 2])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]])
    causal = torch.ones(11, 11).tril().bool()
    mask4 = (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]  # (1, 1, T, T)
    with torch.no_grad():
        lp, ent = token_logprobs(model, packed, mask4, position_ids=pos, chunk_size=3, with_entropy=True)
        la, ea = token_logprobs(model, a, with_entropy=True)
        lb, eb = token_logprobs(model, b, with_entropy=True)
    torch.testing.assert_close(lp[:, 1:5], la[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[:, 6:9], lb[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[:, 6:9], eb[:, 1:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="position_ids"):
        token_logprobs(model, packed, mask4)


def test_final_logit_softcapping_is_applied():
    """Gemma-2 caps logits with c * tanh(z / c); the chunked path must apply it like the model does."""
    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        final_logit_softcapping=0.5,
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(1, V, (2, 6))
    with torch.no_grad():
        lp, _ = token_logprobs(model, ids, chunk_size=2)
        ref, _ = naive(model, ids)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)


def test_bad_arguments(data):
    ids, mask, _ = data
    model = tiny_llama()
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(model, ids, mask, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, ids, mask, temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(model, ids, mask, labels=ids[:, :-1])
