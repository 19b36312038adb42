"""Model layer: loading by local path (same code path as a hub id), LoRA, reward/value heads, gating, saving."""

import logging
import os

import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alignflow.config import LoraConfig, ModelConfig
from alignflow.distributed.save import save_model
from alignflow.models import (
    GatingNetwork,
    ModelLoadError,
    combine,
    gated_scores,
    last_token_hidden,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    sequence_scores,
    token_values,
)

V = 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama causal LM and a word-level tokenizer with an eos but NO pad token, saved like a hub repo."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(d)
    return d


def cfg_for(path, **kw) -> ModelConfig:
    lora = kw.pop("lora", None)
    cfg = ModelConfig(name_or_path=str(path), **kw)
    if lora is not None:
        cfg.lora = lora
    return cfg


IDS = torch.tensor([[5, 9, 13, 2, 40, 7], [3, 8, 21, 0, 0, 0]])  # (2, 6), row 1 right-padded
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])


# --------------------------------------------------------------------------------------------- loading
def test_tokenizer_pads_with_eos_and_says_so(tiny_dir, caplog):
    with caplog.at_level(logging.INFO, logger="alignflow.models.loading"):
        tok = load_tokenizer(str(tiny_dir))
    assert tok.pad_token == "</s>" and tok.pad_token_id == 1 and tok.padding_side == "right"
    assert "no pad token" in caplog.text and "</s>" in caplog.text
    batch = tok(["w5 w6 w7", "w9"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 1, 1]]


def test_causal_lm_loads_the_saved_weights(tiny_dir):
    model = load_causal_lm(cfg_for(tiny_dir))
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, ref(IDS, attention_mask=MASK).logits)
    assert model.config._attn_implementation == "sdpa"
    half = load_causal_lm(cfg_for(tiny_dir, dtype="bfloat16", attn_implementation="eager"))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.config._attn_implementation == "eager"


def test_missing_path_gives_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match="no_such_model") as err:
        load_causal_lm(cfg_for(missing))
    assert "not a local directory" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert isinstance(err.value, OSError)
    with pytest.raises(ModelLoadError, match="no_such_model"):
        load_tokenizer(str(missing))
    with pytest.raises(ModelLoadError, match="name_or_path"):
        load_causal_lm(ModelConfig())


def test_gradient_checkpointing_keeps_gradients(tiny_dir):
    plain = load_causal_lm(cfg_for(tiny_dir)).train()
    ckpt = load_causal_lm(cfg_for(tiny_dir, gradient_checkpointing=True)).train()
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    for m in (plain, ckpt):
        m(IDS, attention_mask=MASK, labels=IDS).loss.backward()
    for a, b in zip(plain.parameters(), ckpt.parameters(), strict=False):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_can_be_switched_off(tiny_dir):
    lora = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["all-linear"])
    model = load_causal_lm(cfg_for(tiny_dir, lora=lora))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("mlp.down_proj.lora_A" in n for n in trainable)  # all-linear reaches the MLP too
    assert not any("lm_head" in n for n in trainable)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at 0: make the adapters change the output
        on = model(IDS, attention_mask=MASK).logits
        with model.disable_adapter():
            off = model(IDS, attention_mask=MASK).logits
        ref = base(IDS, attention_mask=MASK).logits
    torch.testing.assert_close(off, ref)
    assert (on - ref).abs().max() > 1e-3


def test_lora_bad_target_names_the_key(tiny_dir):
    lora = LoraConfig(enabled=True, target_modules=["no_such_proj"])
    with pytest.raises(ModelLoadError, match="target_modules"):
        load_causal_lm(cfg_for(tiny_dir, lora=lora))


# --------------------------------------------------------------------------------------------- reward / value
def test_reward_heads_are_seeded_per_row_and_reproducible(tiny_dir):
    """Row i of the new score head comes from seed + i: rows differ, the same seed reproduces them, and
    seed 8's row 0 is seed 7's row 1 (so head i of an ensemble = the head of the model seeded seed + i)."""
    a = load_reward_model(cfg_for(tiny_dir), num_labels=3, seed=7, pad_token_id=1)
    b = load_reward_model(cfg_for(tiny_dir), num_labels=3, seed=7, pad_token_id=1)
    c = load_reward_model(cfg_for(tiny_dir), num_labels=3, seed=8, pad_token_id=1)
    w = a.score.weight
    assert w.shape == (3, 32) and a.config.pad_token_id == 1
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])
    torch.testing.assert_close(w, b.score.weight, rtol=0, atol=0)
    torch.testing.assert_close(c.score.weight[0], w[1], rtol=0, atol=0)
    assert 0.5 < w.std().item() * 33**0.5 < 1.5  # N(0, 1/(H+1))


def test_sequence_scores_pool_the_last_real_token(tiny_dir):
    """Equals the transformers forward on right-padded rows whose content has no pad token, and a padded row
    scores like the same row unpadded."""
    model = load_reward_model(cfg_for(tiny_dir), num_labels=2, seed=0, pad_token_id=0)
    with torch.no_grad():
        s = sequence_scores(model, IDS, MASK)
        torch.testing.assert_close(s, model(IDS, attention_mask=MASK).logits.float())
        alone = sequence_scores(model, IDS[1:, :3], MASK[1:, :3])
    assert s.shape == (2, 2) and s.dtype == torch.float32
    torch.testing.assert_close(s[1:], alone, atol=1e-6, rtol=0)


def test_trained_reward_head_is_kept_on_reload(tiny_dir, tmp_path):
    model = load_reward_model(cfg_for(tiny_dir), num_labels=1, seed=3, pad_token_id=0)
    with torch.no_grad():
        model.score.weight.fill_(0.25)
    save_model(model, None, tmp_path / "rm")
    again = load_reward_model(cfg_for(tmp_path / "rm"), num_labels=1, seed=99)
    torch.testing.assert_close(again.score.weight, torch.full((1, 32), 0.25))
    assert again.config.pad_token_id == 0


def test_lora_reward_model_trains_adapters_and_the_new_head(tiny_dir):
    lora = LoraConfig(enabled=True, r=4, alpha=8)
    model = load_reward_model(cfg_for(tiny_dir, lora=lora), num_labels=2, seed=1, pad_token_id=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    s = sequence_scores(model, IDS, MASK)  # (2, 2) through the peft wrapper
    s.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_reward_model_needs_a_pad_id(tmp_path):
    LlamaForCausalLM(
        LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="pad_token_id"):
        load_reward_model(cfg_for(tmp_path), num_labels=1)


def test_value_model_gives_one_value_per_token(tiny_dir):
    model = load_value_model(cfg_for(tiny_dir), pad_token_id=0, seed=0).train()  # no dropout before the head
    v = token_values(model, IDS, MASK)
    assert v.shape == IDS.shape and model.score.out_features == 1 and model.dropout.p == 0.0
    real = MASK.bool()  # padding positions differ: we give them the last real position id, transformers counts on
    torch.testing.assert_close(v[real], model(IDS, attention_mask=MASK).logits.squeeze(-1)[real])
    v.sum().backward()
    assert model.score.weight.grad is not None


# --------------------------------------------------------------------------------------------- gating (ArmoRM)
def test_gate_sums_to_beta_and_one_hot_picks_an_attribute():
    """g(x) = beta * softmax(.) so each row sums to beta; with a one-hot gate R is that attribute's score.
    Hand example: scores (1, 2, 3), gate (0.5, 0.25, 0.25) -> 0.5 + 0.5 + 0.75 = 1.75."""
    gate = GatingNetwork(16, 3, hidden=8, layers=2, dropout=0.0)
    with torch.no_grad():
        gate.beta.fill_(2.5)
    w = gate(torch.randn(4, 16))
    torch.testing.assert_close(w.sum(-1), torch.full((4,), 2.5))
    assert (w > 0).all()
    scores = torch.tensor([[1.0, 2.0, 3.0], [4.0, -1.0, 0.5]])
    torch.testing.assert_close(
        combine(scores, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])), torch.tensor([2.0, 0.5])
    )
    torch.testing.assert_close(combine(scores[:1], torch.tensor([[0.5, 0.25, 0.25]])), torch.tensor([1.75]))
    with pytest.raises(ValueError, match="same shape"):
        combine(scores, w[:2, :2])


def test_gate_save_load_roundtrip(tmp_path):
    gate = GatingNetwork(16, 3, hidden=8, layers=3, dropout=0.2, temperature=5.0).eval()
    with torch.no_grad():
        gate.beta.fill_(1.7)
    gate.save(tmp_path)
    assert {"gating.safetensors", "gating.json"} <= set(os.listdir(tmp_path))
    again = GatingNetwork.load(tmp_path)
    x = torch.randn(5, 16)
    torch.testing.assert_close(again(x), gate(x))
    assert again.config == gate.config and not again.training
    with pytest.raises(FileNotFoundError, match="gating"):
        GatingNetwork.load(tmp_path / "empty")


def test_gated_scores_in_one_pass_equal_separate_passes(tiny_dir):
    """The prompt embedding read inside the full sequence equals the last-token state of the prompt alone."""
    model = load_reward_model(cfg_for(tiny_dir), num_labels=3, seed=0, pad_token_id=0)
    gate = GatingNetwork(32, 3, hidden=16, layers=1, dropout=0.0)
    prompt_lengths = torch.tensor([2, 1])
    with torch.no_grad():
        r, scores, w = gated_scores(model, gate, IDS, MASK, prompt_lengths)
        prompt_mask = torch.tensor([[1, 1], [1, 0]])
        emb = last_token_hidden(model, IDS[:, :2], prompt_mask)  # (2, H)
        torch.testing.assert_close(scores, sequence_scores(model, IDS, MASK))
        torch.testing.assert_close(w, gate(emb), atol=1e-6, rtol=0)
        torch.testing.assert_close(r, combine(scores, gate(emb)), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- saving
def test_save_is_atomic_and_reloads_identically(tiny_dir, tmp_path):
    model = load_causal_lm(cfg_for(tiny_dir))
    tok = load_tokenizer(str(tiny_dir))
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("from an older save")
    save_model(model, tok, out)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .tmp-/.old- directories left behind
    files = set(os.listdir(out))
    assert "model.safetensors" in files and "tokenizer.json" in files and "stale.txt" not in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            again(IDS, attention_mask=MASK).logits, model(IDS, attention_mask=MASK).logits, rtol=0, atol=0
        )
    assert load_tokenizer(str(out)).pad_token == "</s>"


def test_save_lora_adapters_or_merged(tiny_dir, tmp_path):
    """Default: adapters only, which peft loads back onto the base; merge_lora=True: a plain model with the
    adapters folded in, loadable without peft, same outputs."""
    lora = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = load_causal_lm(cfg_for(tiny_dir, lora=lora))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        want = model(IDS, attention_mask=MASK).logits
    save_model(model, None, tmp_path / "adapters")
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapters").eval()
    merged = save_model(model, None, tmp_path / "merged", merge_lora=True)
    assert not isinstance(merged, PeftModel)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS, attention_mask=MASK).logits, want)
        torch.testing.assert_close(plain(IDS, attention_mask=MASK).logits, want, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in plain.state_dict())
