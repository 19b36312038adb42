"""The shared code of the CUDA paths, run on the CPU (tests/test_gpu.py runs the real kernels on a GPU).

* flash varlen attention: :func:`flash_varlen` translates alignflow's request (causal, HF sliding window W, GQA,
  scale, one query per sequence) into both API shapes of ``torch.nn.attention.varlen.varlen_attn`` (torch 2.9:
  ``is_causal``; later: ``window_size``/``enable_gqa``/``scale``). A stand-in kernel with flash's documented
  semantics (query i of a sequence sees keys j with i - left <= j <= i + right, aligned at the end) checks the
  translation, and the model path through it (``cu_seq_lens`` built once and passed down to every layer).
* the graphed decode step: :class:`GraphedLeanRunner` with capture off runs exactly the static-shape step a
  CUDA graph records (whole-capacity attention with -inf for unwritten columns, K/V written at a column held in
  a tensor, live-batch buckets with stale padding rows, in-place compaction); its tokens equal the eager step's.
* the fused sampling draw (torch.compile) equals the eager keyed draw.
* response-only log-probs equal the full computation, values and gradients.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import alignflow.models.varlen as varlen
import alignflow.rollout.engine as engine_mod
import alignflow.rollout.sampling as sampling
from alignflow.models.logprobs import selected_logprobs, token_logprobs
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.rollout.graphs import GraphedLeanRunner, bucket
from tests.test_rollout import PROMPTS, tiny_model


def _mask(nq, nk, left, right):
    """Flash's band: query i (aligned so the last query meets the last key) sees keys j with
    i' - left <= j <= i' + right, i' = i + nk - nq; a negative bound means unbounded."""
    i = torch.arange(nq)[:, None] + (nk - nq)
    j = torch.arange(nk)[None, :]
    ok = torch.ones(nq, nk, dtype=torch.bool)
    if right >= 0:
        ok &= j <= i + right
    if left >= 0:
        ok &= j >= i - left
    return ok


def fake_new(
    q,
    k,
    v,
    cu_q,
    cu_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    """Stand-in for varlen_attn (torch >= 2.10 API) computed per sequence with SDPA."""
    assert q.shape[1] == k.shape[1] or enable_gqa, "GQA needs enable_gqa"
    assert cu_q.dtype == torch.int32 and max_q == int((cu_q[1:] - cu_q[:-1]).max())
    outs = []
    for s in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[s] : cu_q[s + 1]], k[cu_k[s] : cu_k[s + 1]], v[cu_k[s] : cu_k[s + 1]]
        mask = _mask(qs.shape[0], ks.shape[0], *window_size)
        outs.append(
            F.scaled_dot_product_attention(
                qs.transpose(0, 1)[None],
                ks.transpose(0, 1)[None],
                vs.transpose(0, 1)[None],
                attn_mask=mask,
                scale=scale,
                enable_gqa=enable_gqa,
            )[0].transpose(0, 1)
        )
    return torch.cat(outs)


def fake_old(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    """Stand-in for the torch 2.9 API: no GQA, no scale (1/sqrt(D)), no window."""
    assert q.shape[1] == k.shape[1], "the 2.9 kernel has no GQA"
    return fake_new(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0) if is_causal else (-1, -1))


def reference(q, k, v, lens, window=None, scale=None, causal=True):
    """One SDPA call per sequence with HF's conventions (window W: at most W - 1 positions back)."""
    outs, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start : start + n].transpose(0, 1)[None] for t in (q, k, v))
        mask = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
        if window:
            mask &= ~torch.ones(n, n, dtype=torch.bool).tril(-window)
        outs.append(
            F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)[0].transpose(0, 1)
        )
        start += n
    return torch.cat(outs)


@pytest.fixture
def flash(monkeypatch):
    """Install a stand-in kernel (new API by default) and let the flash path run on the CPU."""

    def install(fn=fake_new):
        import inspect

        monkeypatch.setattr(varlen, "_FLASH_API", {"fn": fn, "params": set(inspect.signature(fn).parameters)})
        monkeypatch.setattr(varlen, "FLASH_DEVICES", ("cuda", "cpu"))

    install()
    return install


@pytest.mark.parametrize("api", ["new", "old"])
@pytest.mark.parametrize("window", [None, 3])
def test_flash_varlen_translates_causal_window_gqa_and_scale(flash, api, window):
    flash(fake_new if api == "new" else fake_old)
    torch.manual_seed(0)
    lens = [4, 1, 7, 5]
    q = torch.randn(sum(lens), 4, 8, dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens), 2, 8, dtype=torch.bfloat16) for _ in range(2))
    if window and not varlen.flash_usable(q, window=window):
        assert api == "old"  # the 2.9 kernel has no window: the model path keeps the per-sequence loop
        return
    cu = varlen.cumulative(lens)
    out = varlen.flash_varlen(q, k, v, cu, cu, 7, 7, causal=True, window=window, scale=0.3)
    torch.testing.assert_close(out.float(), reference(q, k, v, lens, window, 0.3).float(), atol=2e-2, rtol=2e-2)


def test_one_query_per_sequence_sees_its_whole_sequence(flash):
    torch.manual_seed(0)
    lens = [4, 1, 7]
    q = torch.randn(sum(lens), 4, 8, dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens), 2, 8, dtype=torch.bfloat16) for _ in range(2))
    cu = varlen.cumulative(lens)
    last = cu[1:].long() - 1
    one = torch.arange(len(lens) + 1, dtype=torch.int32)
    out = varlen.flash_varlen(q[last], k, v, one, cu, 1, 7, causal=False)
    torch.testing.assert_close(out.float(), reference(q, k, v, lens)[last].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("mistral", {"sliding_window": 3})])
def test_model_forward_through_the_flash_path_equals_the_loop(flash, arch, extra):
    """flat_hidden_states and the last-query-only forward, through the stand-in kernel vs the SDPA loop."""
    model = tiny_model(arch=arch, **extra).to(torch.bfloat16)
    lens = [5, 9, 1, 6]
    ids = torch.randint(3, 64, (1, sum(lens)), generator=torch.Generator().manual_seed(0))
    calls = []
    fn = varlen._FLASH_API["fn"]
    varlen._FLASH_API["fn"] = lambda *a, **k: calls.append(1) or fn(*a, **k)
    with torch.no_grad():
        got = varlen.flat_hidden_states(model, ids, lens)
        last = varlen.flat_last_hidden(model, ids, lens)
        varlen.FLASH_DEVICES = ("cuda",)
        ref = varlen.flat_hidden_states(model, ids, lens)
    assert len(calls) >= 2 * model.config.num_hidden_layers - (1 if extra else 0)
    torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(last.float(), ref[0, varlen.last_positions(lens)].float(), atol=3e-2, rtol=3e-2)


def test_lean_prefill_through_the_flash_path_gives_the_same_tokens(flash):
    model = tiny_model().to(torch.bfloat16)
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    got = HFEngine(model, eos_token_id=2, pad_token_id=0).generate(PROMPTS, params)["response_ids"]
    varlen.FLASH_DEVICES = ("cuda",)
    ref = HFEngine(model, eos_token_id=2, pad_token_id=0).generate(PROMPTS, params)["response_ids"]
    assert (got == ref).float().mean() >= 0.95


def test_buckets():
    assert [bucket(b) for b in (1, 8, 9, 16, 17, 200, 256)] == [8, 8, 16, 16, 32, 256, 256]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_new_tokens=24, logprobs=True),
        SamplingParams(n=4, temperature=1.0, max_new_tokens=24, logprobs=True, seeds=[11, 12, 13, 14, 15, 16]),
    ],
)
def test_static_graph_step_equals_the_eager_step(monkeypatch, params):
    """The step a CUDA graph records, run eagerly: same tokens and log-probs as LeanRunner, through live-batch
    buckets (24 rows -> 16 -> 8 as rows end; stale padding rows in each bucket)."""
    model = tiny_model()
    ref = HFEngine(model, eos_token_id=2, pad_token_id=0).generate(PROMPTS, params)
    monkeypatch.setattr(engine_mod, "graphs_supported", lambda m: None)
    runners = []
    real = GraphedLeanRunner.step

    def step(self, token, position, t):
        runners.append((self, token.shape[0]))
        return real(self, token, position, t)

    monkeypatch.setattr(GraphedLeanRunner, "step", step)
    engine = HFEngine(model, eos_token_id=2, pad_token_id=0)
    got = engine.generate(PROMPTS, params)
    assert engine.last_path == "lean+graphs"
    assert len({b for _, b in runners}) > 1, "rows should end at different steps (bucket changes)"
    assert torch.equal(got["response_ids"], ref["response_ids"])
    torch.testing.assert_close(got["sampling_logprobs"], ref["sampling_logprobs"], atol=1e-5, rtol=1e-5)


def test_fused_keyed_draw_equals_the_eager_draw(monkeypatch):
    monkeypatch.setattr(sampling, "FUSE_DEVICES", ("cpu",))
    monkeypatch.setattr(sampling, "FUSE_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    logits = torch.randn(24, 3000) * 3
    keys = sampling.sample_keys([1, 2, 3], 8)
    fused = [sampling.sample_from_logits(logits, None, keys=keys, step=t) for t in range(3)]
    assert sampling._FUSED.get("broken") is None and "fn" in sampling._FUSED
    monkeypatch.setattr(sampling, "USE_COMPILE", False)
    eager = [sampling.sample_from_logits(logits, None, keys=keys, step=t) for t in range(3)]
    for a, b in zip(fused, eager, strict=False):
        assert torch.equal(a, b)


def test_selected_logprobs_equal_the_full_computation_values_and_grads():
    """log p and entropy at chosen positions of a padding-free row, with the LM head on those positions only."""
    model = tiny_model()
    lens = [5, 9, 1, 6]
    ids = torch.randint(3, 64, (1, sum(lens)), generator=torch.Generator().manual_seed(0))
    where = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    lp, ent = selected_logprobs(model, ids, where, seq_lens=lens, with_entropy=True, temperature=0.7)
    lp.sum().backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full, full_ent = token_logprobs(model, ids, seq_lens=lens, with_entropy=True, temperature=0.7)
    starts = torch.zeros_like(where)
    starts[0, varlen.cumulative(lens)[:-1].long()] = True
    sel = where & ~starts
    full[sel].sum().backward()
    torch.testing.assert_close(lp, full[sel], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, full_ent[sel], atol=1e-5, rtol=1e-5)
    for a, p in zip(g, model.parameters(), strict=False):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-4)
    assert math.isclose(float(sel.sum()), lp.shape[0])


def test_fp32_model_under_autocast_takes_the_flash_path(flash):
    """mixed_precision=bf16 on an fp32 model (the demo on a GPU): RoPE hands the attention fp32 q/k; they are cast
    to the autocast dtype (as SDPA would) and go through the flash kernel, not the per-sequence loop."""
    model = tiny_model()
    lens = [5, 9, 1, 6]
    ids = torch.randint(3, 64, (1, sum(lens)), generator=torch.Generator().manual_seed(0))
    calls = []
    fn = varlen._FLASH_API["fn"]
    varlen._FLASH_API["fn"] = lambda *a, **k: calls.append(a[0].dtype) or fn(*a, **k)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = varlen.flat_hidden_states(model, ids, lens)
        varlen.FLASH_DEVICES = ("cuda",)
        ref = varlen.flat_hidden_states(model, ids, lens)
    assert calls and set(calls) == {torch.bfloat16}
    torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)
