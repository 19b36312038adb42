"""CUDA paths against their references (issue: the training and rollout paths on a GPU).

Marked ``gpu``: ``pytest -m gpu`` runs them on a machine with CUDA; the CPU suite deselects them by marker
(``addopts`` in pyproject.toml), and still covers every shared code path with the CPU references. Each test
compares a CUDA path with the computation it replaces:

* flash varlen attention (``torch.nn.attention.varlen.varlen_attn``) against the per-sequence SDPA loop, values
  and gradients, with GQA, a sliding window and the last-query-only layer of reward models;
* response-only log-probs (``selected_logprobs``) against the full ``token_logprobs``, values and gradients;
* CUDA-graph decoding against the eager decode step and against ``generate`` (greedy), and seeded sampling;
* SFT and GRPO running end to end on CUDA and learning.
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run with pytest -m gpu on a GPU)"),
]

from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import alignflow.models.varlen as varlen  # noqa: E402
import alignflow.rollout.graphs as graphs  # noqa: E402
from alignflow.models.logprobs import selected_logprobs, token_logprobs  # noqa: E402
from alignflow.rollout import HFEngine, SamplingParams  # noqa: E402

CUDA = torch.device("cuda")
LENS = [5, 17, 1, 33, 64, 9]
V = 128


def model_of(kind="qwen2", dtype=torch.bfloat16, **kw):
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=V,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[kind]
    return cls[1](cls[0](**(sizes | kw))).to(CUDA, dtype)


def flat_row(lens=LENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (1, sum(lens)), generator=g).to(CUDA)


def hidden_and_grads(model, ids, lens, flash: bool):
    varlen.USE_FLASH = flash
    try:
        model.zero_grad()
        h = varlen.flat_hidden_states(model, ids, lens)  # (1, N, H)
        w = torch.randn(h.shape, generator=torch.Generator(device=CUDA).manual_seed(0), device=CUDA, dtype=h.dtype)
        (h.float() * w.float()).sum().backward()
        return h.detach().float(), torch.cat(
            [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
        )
    finally:
        varlen.USE_FLASH = True


def test_flash_kernel_is_available_and_used():
    """The torch on this machine has varlen_attn and the bf16 CUDA forward takes it."""
    q = torch.zeros(4, 8, 16, device=CUDA, dtype=torch.bfloat16)
    assert varlen.flash_usable(q), "torch.nn.attention.varlen.varlen_attn is missing or refused bf16 CUDA input"


@pytest.mark.parametrize("kind,extra", [("qwen2", {}), ("llama", {}), ("mistral", {"sliding_window": 8})])
def test_varlen_attn_equals_the_per_sequence_loop(kind, extra):
    """Flash varlen (causal, GQA 8/2 heads, sliding window for mistral) vs one SDPA call per sequence: hidden
    states and parameter gradients agree to bf16 precision."""
    model = model_of(kind, **extra)
    ids = flat_row()
    h_ref, g_ref = hidden_and_grads(model, ids, LENS, flash=False)
    h, g = hidden_and_grads(model, ids, LENS, flash=True)
    assert (h - h_ref).abs().max() <= 0.03 * h_ref.abs().max()
    assert (g - g_ref).norm() <= 0.02 * g_ref.norm()


def test_flash_varlen_against_sdpa_directly():
    """The adapter on random q/k/v: causal GQA, a window of 4, and one non-causal query per sequence."""
    torch.manual_seed(0)
    lens = [3, 10, 1, 20]
    n = sum(lens)
    q = torch.randn(n, 8, 64, device=CUDA, dtype=torch.bfloat16)
    k, v = (torch.randn(n, 2, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(2))
    cu = varlen.cumulative(lens).to(CUDA)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    for window in (None, 4):
        if window and not varlen.flash_usable(q, window=window):
            continue  # this torch's varlen_attn takes no window: the model path keeps the loop (tested above)
        out = varlen.flash_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, window=window, scale=0.1)
        for s, m in zip(starts, lens, strict=False):
            qs, ks, vs = (t[s : s + m].transpose(0, 1)[None].float() for t in (q, k, v))
            mask = torch.ones(m, m, dtype=torch.bool, device=CUDA).tril()
            if window:
                mask &= ~torch.ones(m, m, dtype=torch.bool, device=CUDA).tril(-window)
            ref = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=0.1, enable_gqa=True
            )[0].transpose(0, 1)
            torch.testing.assert_close(out[s : s + m].float(), ref, atol=2e-2, rtol=2e-2)


def test_last_query_layer_equals_full_forward():
    """The reward-model path (last decoder layer computes only each sequence's last query) through flash."""
    model = model_of("qwen2")
    ids = flat_row()
    with torch.no_grad():
        last = varlen.flat_last_hidden(model, ids, LENS).float()
        full = varlen.flat_hidden_states(model, ids, LENS)[0, varlen.last_positions(LENS, CUDA)].float()
    assert (last - full).abs().max() <= 0.03 * full.abs().max()


def test_response_only_logprobs_equal_the_full_computation():
    """selected_logprobs (LM head on the chosen positions only) == token_logprobs(...)[where], values and
    gradients, in bf16 on CUDA with fp32 log-softmax."""
    model = model_of("qwen2")
    ids = flat_row()
    where = torch.rand(ids.shape, generator=torch.Generator(device=CUDA).manual_seed(3), device=CUDA) < 0.5
    lp, ent = selected_logprobs(model, ids, where, seq_lens=LENS, with_entropy=True, temperature=0.7)
    lp.sum().backward()
    g_sel = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    full, full_ent = token_logprobs(model, ids, seq_lens=LENS, with_entropy=True, temperature=0.7)
    starts = torch.zeros_like(where)
    starts[0, varlen.cumulative(LENS)[:-1].long().to(CUDA)] = True
    sel = where & ~starts
    (full[sel]).sum().backward()
    g_full = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(lp, full[sel], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(ent, full_ent[sel], atol=2e-2, rtol=1e-2)
    assert (g_sel - g_full).norm() <= 0.02 * g_full.norm()


PROMPTS = [[1, 5, 9, 17], [1, 33, 12, 40, 41, 7, 8, 22, 19], [1, 60], [1, 3, 4, 5, 6, 7, 8]] * 5


def run_engine(model, params, graphed: bool):
    graphs.USE_GRAPHS = graphed
    try:
        engine = HFEngine(model, eos_token_id=2, pad_token_id=0)
        out = engine.generate(PROMPTS, params)
        assert engine.last_path == ("lean+graphs" if graphed else "lean"), (engine.fallback_reason, engine.graph_reason)
        return out
    finally:
        graphs.USE_GRAPHS = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decoding_equals_eager_and_generate(dtype):
    """Greedy, 48 new tokens, 20 rows (graph buckets 32 -> 16 -> 8 as rows end): the graphed decode step gives
    the eager step's tokens (>= 99% of them; the masked-column attention may round a near-tie differently),
    and transformers' generate agrees as closely."""
    model = model_of("llama", dtype=dtype).eval()
    with torch.no_grad():
        model.lm_head.weight[2] += 0.05  # an EOS bias so that rows end at different steps (bucket changes)
    params = SamplingParams(temperature=0.0, max_new_tokens=48, logprobs=True)
    a, b = run_engine(model, params, True), run_engine(model, params, False)
    same = (a["response_ids"] == b["response_ids"]).float().mean()
    assert same >= 0.99, same
    with torch.no_grad():
        ref = model.generate(
            input_ids=a["prompt_ids"],
            attention_mask=a["prompt_mask"],
            do_sample=False,
            max_new_tokens=48,
            eos_token_id=2,
            pad_token_id=0,
        )[:, a["prompt_ids"].shape[1] :]
    width = min(ref.shape[1], a["response_ids"].shape[1])
    agree = (ref[:, :width] == a["response_ids"][:, :width]).float().mean()
    assert agree >= 0.95, agree
    lp_close = (a["sampling_logprobs"] - b["sampling_logprobs"]).abs().max()
    assert lp_close < (1e-3 if dtype == torch.float32 else 0.1)


def test_graph_sampling_with_seeds_matches_eager():
    """Per-prompt seeded sampling (the RL path) through the graphs gives the eager path's samples."""
    model = model_of("qwen2", dtype=torch.float32).eval()
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=32, seeds=list(range(len(PROMPTS))), logprobs=True)
    a, b = run_engine(model, params, True), run_engine(model, params, False)
    assert (a["response_ids"] == b["response_ids"]).float().mean() >= 0.99


def test_sft_learns_on_cuda(reviews_task, tmp_path):
    """SFT end to end on CUDA (flash varlen attention, completion-only head, fused AdamW): the loss falls."""
    from alignflow.config import SFTConfig, from_dict
    from alignflow.trainers.sft import train_sft

    res = train_sft(
        from_dict(
            SFTConfig,
            {
                "model": {"name_or_path": str(reviews_task.model_dir), "tokenizer": str(reviews_task.tokenizer_dir)},
                "data": {"path": str(reviews_task.sft_path), "max_len": 64, "eval_fraction": 0.1},
                "optim": {"lr": 3e-3, "scheduler": "constant"},
                "train": {
                    "output_dir": str(tmp_path / "sft"),
                    "batch_size": 32,
                    "max_steps": 40,
                    "progress": False,
                    "device": "cuda",
                    "mixed_precision": "bf16",
                },
            },
        )
    )
    assert res.losses[-1] < 0.7 * res.losses[0]
