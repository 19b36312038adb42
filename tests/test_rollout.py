"""Rollout engine: logits processors against hand-computed values, then HFEngine against transformers'
``generate`` (greedy, token for token), row dropping, stopping, seeding, grouping and log-probs; then the
lean forward of the fast path (llama / qwen2 / qwen3 / mistral, rope scaling) against ``generate`` and against
the HF-forward path, prefix sharing, weight updates between calls, and the fallback for what it does not cover."""

import math

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from alignflow.config import ConfigError
from alignflow.rollout import HFEngine, RolloutEngine, SamplingParams
from alignflow.rollout.kv_cache import preallocated_cache, select_rows
from alignflow.rollout.lean import unsupported_reason
from alignflow.rollout.sampling import (
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    chosen_logprobs,
    presence_mask,
    process_logits,
    sample_from_logits,
    sample_tokens,
)

PAD, BOS, EOS = 0, 1, 2
INF = float("-inf")
# Prompts of different lengths (left padding matters); with EOS_BIAS the greedy lengths are spread out.
PROMPTS = [
    [BOS, 5, 9, 17],
    [BOS, 33, 12, 40, 41, 7, 8, 22, 19],
    [BOS, 60],
    [BOS, 3, 4, 5, 6, 7, 8],
    [BOS, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 61],
    [BOS, 11, 13],
]
EOS_BIAS = 0.1  # greedy lengths with 24 new tokens: 24, 2, 14, 24, 4, 21


def tiny_model(seed: int = 0, eos_bias: float = EOS_BIAS, arch: str = "llama", **config) -> LlamaForCausalLM:
    """Random decoder (vocab 64, hidden 32, 2 layers, GQA 4/2 heads) whose lm_head has a bias on EOS, so that
    some rows end early (a random-init model almost never picks EOS on its own). arch: llama | qwen2 (Q/K/V
    biases, given random values: they start at zero) | qwen3 (q/k norms, given random weights) | mistral."""
    torch.manual_seed(seed)
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_class, model_class = classes[arch]
    extra = {"head_dim": 8} if arch == "qwen3" else {}
    cfg = config_class(
        **(
            {
                "vocab_size": 64,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
                "pad_token_id": PAD,
                "bos_token_id": BOS,
                "eos_token_id": EOS,
            }
            | extra
            | config
        )
    )
    model = model_class(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                param.normal_(0.0, 0.2)
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)
    head = torch.nn.Linear(32, 64, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[EOS] = eos_bias
    model.lm_head = head
    return model


def generate_greedy(model, out, max_new=24):
    """transformers' greedy ``generate`` on the engine's left-padded prompts: (B, max_new) new tokens."""
    with torch.no_grad():
        ref = model.generate(
            input_ids=out["prompt_ids"],
            attention_mask=out["prompt_mask"],
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    return ref[:, out["prompt_ids"].shape[1] :]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: id i <-> word 'w{i}' (0, 1, 2 are <pad>, <s>, </s>); decode joins with spaces."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS} | {f"w{i}": i for i in range(3, 64)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def greedy(max_new=24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new, **kw)


# ----------------------------------------------------------------------------------------------- processors
def test_temperature_hand_computed():
    """[2, -1, 0.5] / 0.5 = [4, -2, 1]."""
    out = apply_temperature(torch.tensor([[2.0, -1.0, 0.5]]), 0.5)
    assert torch.equal(out, torch.tensor([[4.0, -2.0, 1.0]]))


def test_top_k_hand_computed():
    """Row [1, 3, 2, 0], k=2: the two largest are 3 and 2, the others become -inf; k=0 and k>=V keep all."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(apply_top_k(logits, 2), torch.tensor([[INF, 3.0, 2.0, INF]]))
    assert torch.equal(apply_top_k(logits, 0), logits)
    assert torch.equal(apply_top_k(logits, 4), logits)


def test_top_p_hand_computed():
    """Probabilities in vocabulary order [0.15, 0.5, 0.05, 0.3]; sorted 0.5, 0.3, 0.15, 0.05 have exclusive
    cumulative mass 0, 0.5, 0.8, 0.95. p=0.7 keeps tokens whose mass-before < 0.7: 0.5 and 0.3 (ids 1, 3);
    p=0.85 also keeps 0.15 (id 0); p=0.4 keeps only the top token (id 1)."""
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(apply_top_p(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.7) == [False, True, False, True]
    assert kept(0.85) == [True, True, False, True]
    assert kept(0.4) == [False, True, False, False]
    assert torch.equal(apply_top_p(logits, 1.0), logits)
    kept_values = apply_top_p(logits, 0.7)[0]
    assert torch.allclose(kept_values[[1, 3]], logits[0, [1, 3]])  # survivors are unchanged


def test_min_p_hand_computed():
    """Probabilities [0.5, 0.3, 0.15, 0.05], min_p=0.4: threshold 0.4 * 0.5 = 0.2 keeps 0.5 and 0.3;
    min_p=0.25 (threshold 0.125) also keeps 0.15."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(apply_min_p(logits, 0.4))[0].tolist() == [True, True, False, False]
    assert torch.isfinite(apply_min_p(logits, 0.25))[0].tolist() == [True, True, True, False]
    assert torch.equal(apply_min_p(logits, 0.0), logits)


def test_repetition_penalty_hand_computed():
    """CTRL/HF convention, penalty 2: seen positive 2 -> 2/2 = 1, seen negative -1 -> -1*2 = -2, unseen 3 and
    -4 unchanged."""
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 3.0, -4.0]]))


def test_presence_mask_ignores_padding():
    """Row 0 = [pad 0, 5, 2] with the first position masked: tokens {5, 2} seen, token 0 not."""
    ids = torch.tensor([[0, 5, 2], [3, 3, 1]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    seen = presence_mask(ids, mask, 6)
    assert seen.tolist() == [[False, False, True, False, False, True], [False, True, False, True, False, False]]


def test_process_logits_order():
    """Penalty 2 on token 0, then temperature 0.5, then top-k 2: [4, 3, 1] -> [2, 3, 1] -> [4, 6, 2] -> [4, 6, -inf].
    Greedy applies only the penalty."""
    logits = torch.tensor([[4.0, 3.0, 1.0]])
    seen = torch.tensor([[True, False, False]])
    params = SamplingParams(temperature=0.5, top_k=2, repetition_penalty=2.0)
    assert torch.equal(process_logits(logits, params, seen), torch.tensor([[4.0, 6.0, INF]]))
    greedy_params = SamplingParams(temperature=0.0, top_k=2, repetition_penalty=2.0)
    assert torch.equal(process_logits(logits, greedy_params, seen), torch.tensor([[2.0, 3.0, 1.0]]))


def test_chosen_logprobs_hand_computed():
    """Logits [0, ln 3] at T=1: softmax [1/4, 3/4]; at T=0.5 the logits double to [0, ln 9]: [1/10, 9/10]."""
    logits = torch.tensor([[0.0, math.log(3.0)]])
    token = torch.tensor([1])
    assert chosen_logprobs(logits, token, 1.0).item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert chosen_logprobs(logits, token, 0.0).item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert chosen_logprobs(logits, token, 0.5).item() == pytest.approx(math.log(0.9), abs=1e-6)


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampler_draws_from_the_processed_distribution(top_k):
    """40,000 seeded draws from one row (V = 8): the empirical frequencies match softmax(process_logits(...))
    within 0.01 (about 4 standard errors). top_k=5 goes through the candidate path of sample_tokens (top-k
    first, then top-p / min-p on the candidates); top_k=0 through the full-vocabulary path. Tokens the
    processors remove are never drawn."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0]])
    seen = torch.tensor([[False, True, False, False, False, False, False, True]])
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    target = process_logits(logits, params, seen).softmax(-1)[0]  # (V,)
    rows = 40_000
    draws = sample_tokens(logits.expand(rows, -1), params, torch.Generator().manual_seed(0), seen.expand(rows, -1))
    freq = torch.bincount(draws, minlength=8).float() / rows
    assert torch.allclose(freq, target, atol=0.01)
    assert (freq[target == 0] == 0).all() and (target == 0).any()


def test_sample_from_logits_never_picks_masked_tokens():
    logits = torch.tensor([[INF, 0.0, INF, 1.0]]).expand(1000, -1)
    draws = sample_from_logits(logits, torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {1, 3}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"stop_strings": [""]}, "stop_strings"),
        ({"seed": "x"}, "seed"),
        ({"logprobs": "yes"}, "logprobs"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


# ----------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("eos_bias", [EOS_BIAS, 0.3])
def test_greedy_matches_generate_token_for_token(eos_bias):
    """Left-padded prompts of 2..13 tokens; several rows end early with EOS (with bias 0.3 all of them, so
    generation stops before max_new_tokens). Both KV-cache variants equal ``model.generate(do_sample=False)``
    exactly, padding after EOS included."""
    model = tiny_model(eos_bias=eos_bias)
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    ours = engine.generate(PROMPTS, greedy())
    assert engine.last_path == "lean" and engine.fallback_reason is None
    assert isinstance(engine, RolloutEngine)
    assert torch.equal(ours["response_ids"], generate_greedy(model, ours))
    lengths = ours["response_mask"].sum(1).tolist()
    assert min(lengths) < 24  # the test really exercises early endings
    assert (max(lengths) == 24) == (eos_bias == EOS_BIAS)  # ... and, with bias 0.3, an early stop of all rows
    for kwargs in ({"fast_path": False}, {"fast_path": False, "preallocate": False}):  # the HF-forward path
        hf = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS, **kwargs)
        assert torch.equal(hf.generate(PROMPTS, greedy())["response_ids"], ours["response_ids"])
        assert hf.last_path == "hf" and hf.fallback_reason == "fast_path=False"


def test_batch_layout(model):
    """Shapes, left-padded prompts, right-padded responses, masks covering the EOS, input_ids = cat, and
    finish reasons that agree with the tokens."""
    out = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate(PROMPTS, greedy())
    rows, tp = len(PROMPTS), max(map(len, PROMPTS))
    assert out["prompt_ids"].shape == (rows, tp)
    for i, p in enumerate(PROMPTS):
        assert out["prompt_ids"][i, tp - len(p) :].tolist() == p
        assert out["prompt_mask"][i].tolist() == [0] * (tp - len(p)) + [1] * len(p)
        n = int(out["response_mask"][i].sum())
        assert out["response_mask"][i, :n].all() and not out["response_mask"][i, n:].any()
        assert (out["response_ids"][i, n:] == PAD).all()
        ended_by_eos = out["response_ids"][i, n - 1].item() == EOS
        assert out["finish_reason"][i] == ("eos" if ended_by_eos else "length")
        assert EOS not in out["response_ids"][i, : n - 1].tolist()
    assert torch.equal(out["input_ids"], torch.cat([out["prompt_ids"], out["response_ids"]], 1))
    assert torch.equal(out["attention_mask"], torch.cat([out["prompt_mask"], out["response_mask"]], 1))
    assert out["prompt_index"] == list(range(rows))
    assert "sampling_logprobs" not in out


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("every", [1, 3])
def test_finished_rows_leave_the_batch(model, every, fast_path):
    """A forward pre-hook on lm_head records the rows of every logits computation (both paths call it). After
    the prefill (6 prompts), the decode step that follows sampling step t sees the rows still running at the
    last compaction: with compact_every=k that happened after step c = k*floor((t+1)/k) - 1, so the rows
    whose response is longer than c+1 (every row before the first compaction). The output does not depend
    on k."""
    sizes = []
    hook = model.lm_head.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS, compact_every=every, fast_path=fast_path)
        out = engine.generate(PROMPTS, greedy())
    finally:
        hook.remove()
    assert engine.last_path == ("lean" if fast_path else "hf")
    lengths = out["response_mask"].sum(1)
    expected = [int((lengths > every * ((t + 1) // every)).sum()) for t in range(23)]
    assert sizes[0] == len(PROMPTS)
    assert sizes[1:] == expected
    assert sizes[-1] < sizes[1]  # it did shrink
    reference = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate(PROMPTS, greedy())
    assert torch.equal(out["response_ids"], reference["response_ids"])
    assert out["finish_reason"] == reference["finish_reason"]


def test_stop_token_ids_end_rows(model):
    """Take a token that greedy emits in row 0 (at its first occurrence j); with it as a stop id, row 0 ends
    at j (length j+1, reason 'stop') with the same prefix, and every row ends at its own first occurrence."""
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    free = engine.generate(PROMPTS, greedy())
    row0 = free["response_ids"][0].tolist()
    stop = next(t for t in row0[3:] if t not in (EOS, PAD))
    stopped = engine.generate(PROMPTS, greedy(stop_token_ids=[stop]))
    for i in range(len(PROMPTS)):
        n = int(free["response_mask"][i].sum())
        tokens = free["response_ids"][i, :n].tolist()
        cut = tokens.index(stop) + 1 if stop in tokens else n
        got = int(stopped["response_mask"][i].sum())
        assert got == cut
        assert stopped["response_ids"][i, :got].tolist() == tokens[:cut]
        expected_reason = "stop" if stop in tokens else free["finish_reason"][i]
        assert stopped["finish_reason"][i] == expected_reason


def test_stop_strings_end_rows(model):
    """A two-word stop string taken from row 0's text. Reference, by brute force: each row ends at the
    smallest k such that decode(tokens[:k]) contains the string (or runs as without it)."""
    tokenizer = word_tokenizer()
    assert tokenizer.decode([5, 6, EOS]) == "w5 w6 </s>"
    engine = HFEngine(model, tokenizer)
    assert engine.pad_id == PAD and engine.eos_ids == [EOS]
    free = engine.generate(PROMPTS, greedy())
    words = tokenizer.decode(free["response_ids"][0, 4:6].tolist())
    stopped = engine.generate(PROMPTS, greedy(stop_strings=["zzz", words]))
    for i in range(len(PROMPTS)):
        tokens = free["response_ids"][i, : int(free["response_mask"][i].sum())].tolist()
        cut = next((k for k in range(1, len(tokens) + 1) if words in tokenizer.decode(tokens[:k])), None)
        got = int(stopped["response_mask"][i].sum())
        assert got == (cut or len(tokens))
        assert stopped["response_ids"][i, :got].tolist() == tokens[:got]
        assert stopped["finish_reason"][i] == ("stop" if cut else free["finish_reason"][i])
    assert stopped["finish_reason"][0] == "stop" and int(stopped["response_mask"][0].sum()) <= 6


def test_stop_strings_need_a_tokenizer(model):
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate(PROMPTS, greedy(stop_strings=["w5"]))


def test_bad_prompts_are_named(model):
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]\[2\] = 64"):
        engine.generate([[1, 2], [1, 3, 64]], greedy())
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] must be a non-empty"):
        engine.generate([[]], greedy())


def test_seeded_sampling_is_reproducible(model):
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=7, logprobs=True)
    a, b = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert torch.equal(a["response_ids"], b["response_ids"])
    assert torch.equal(a["sampling_logprobs"], b["sampling_logprobs"])
    c = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=8))
    assert not torch.equal(a["response_ids"], c["response_ids"])


def test_n_samples_are_grouped(model):
    """n=3: rows 3i..3i+2 carry prompt i; the samples of a group differ; greedy n=2 repeats greedy n=1."""
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    out = engine.generate(PROMPTS, SamplingParams(temperature=1.0, n=3, max_new_tokens=12, seed=0))
    assert len(out) == 3 * len(PROMPTS)
    assert out["prompt_index"] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    tp = out["prompt_ids"].shape[1]
    for row, i in enumerate(out["prompt_index"]):
        assert out["prompt_ids"][row, tp - len(PROMPTS[i]) :].tolist() == PROMPTS[i]
    distinct = {tuple(out["response_ids"][r].tolist()) for r in range(3)}
    assert len(distinct) > 1
    one, two = engine.generate(PROMPTS, greedy()), engine.generate(PROMPTS, greedy(n=2))
    assert torch.equal(two["response_ids"][0::2], one["response_ids"])
    assert torch.equal(two["response_ids"][1::2], one["response_ids"])


def test_sampling_logprobs_match_a_training_forward(model):
    """Recompute with one forward (no cache) over the returned input_ids / attention_mask / position_ids:
    log_softmax(logits / 0.7) at the chosen tokens equals sampling_logprobs on response tokens (top-k 20 and
    top-p do not enter). The returned tensors are ordinary (not inference-mode) tensors: backward works."""
    model.train()
    out = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate(
        PROMPTS, SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=16, seed=3, logprobs=True)
    )
    assert model.training  # training mode restored
    model.eval()
    tp, tr = out["prompt_ids"].shape[1], out["response_ids"].shape[1]
    logits = model(
        input_ids=out["input_ids"], attention_mask=out["attention_mask"], position_ids=out["position_ids"]
    ).logits  # (B, Tp+Tr, V)
    predicting = logits[:, tp - 1 : tp - 1 + tr] / 0.7  # (B, Tr, V): position Tp-1+t predicts response token t
    recomputed = predicting.log_softmax(-1).gather(-1, out["response_ids"][..., None]).squeeze(-1)  # (B, Tr)
    mask = out["response_mask"].bool()
    assert torch.allclose(recomputed[mask], out["sampling_logprobs"][mask], atol=1e-5)
    assert (out["sampling_logprobs"][~mask] == 0).all()
    recomputed[mask].sum().backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad()


def test_top_k_one_equals_greedy(model):
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    sampled = engine.generate(PROMPTS, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=24, seed=5))
    assert torch.equal(sampled["response_ids"], engine.generate(PROMPTS, greedy())["response_ids"])


def test_repetition_penalty_matches_generate(model):
    """Equal-length prompts (generate also penalises left-padding tokens, we do not): greedy with penalty 1.5
    equals generate(do_sample=False, repetition_penalty=1.5)."""
    prompts = [[BOS, 5, 9, 17, 5], [BOS, 33, 12, 40, 41], [BOS, 60, 60, 61, 62]]
    out = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate(prompts, greedy(repetition_penalty=1.5))
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.tensor(prompts),
            do_sample=False,
            max_new_tokens=24,
            repetition_penalty=1.5,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    assert torch.equal(out["response_ids"], ref[:, 5:])
    assert not torch.equal(
        out["response_ids"],
        HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate(prompts, greedy())["response_ids"],
    )


def test_select_rows_moves_only_the_refilled_rows():
    """Rows 0..4, rows 1 and 3 finished: the kept prefix is 3 rows, slot 1 is refilled from row 4, so the
    result is rows [0, 4, 2] -- the same as DynamicCache.batch_select_indices([0, 4, 2])."""
    cfg = tiny_model().config
    keys = [torch.randn(5, 2, 3, 8) for _ in range(2)]
    ours, ref = preallocated_cache(cfg, capacity=10), DynamicCache(config=cfg)
    for cache in (ours, ref):
        for layer, k in enumerate(keys):
            cache.update(k, -k, layer)
    order = torch.tensor([0, 4, 2])
    select_rows(ours, order)
    ref.batch_select_indices(order)
    for a, b in zip(ours.layers, ref.layers, strict=False):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    ours.update(torch.ones(3, 2, 1, 8), torch.ones(3, 2, 1, 8), 0)
    assert ours.layers[0].keys.shape == (3, 2, 4, 8) and ours.get_seq_length() == 4


# ----------------------------------------------------------------------------------------------- lean forward
@pytest.mark.parametrize(
    "arch, seed, eos_bias, attention",
    [
        ("llama", 1, 0.05, "sdpa"),
        ("llama", 2, 0.15, "sdpa"),
        ("qwen2", 0, 0.2, "sdpa"),
        ("qwen2", 1, 0.25, "sdpa"),
        ("qwen3", 0, 0.1, "sdpa"),
        ("qwen3", 1, 0.1, "sdpa"),
        ("mistral", 0, 0.1, "sdpa"),
        ("llama", 1, 0.05, "eager"),
    ],
)
def test_lean_forward_greedy_matches_generate(arch, seed, eos_bias, attention):
    """The fast path on each supported architecture (GQA 4/2 heads everywhere; qwen2 with random Q/K/V biases,
    qwen3 with random q/k norms), prompts of 2..13 tokens left-padded, rows ending at different steps (the
    EOS bias is chosen per model for that): token for token equal to ``generate(do_sample=False)``, and
    log-probs bit-identical to the HF forward's with sdpa attention (the lean forward's own); with eager
    attention (same math, other rounding) equal to 1e-6."""
    model = tiny_model(seed=seed, arch=arch, eos_bias=eos_bias, attn_implementation=attention)
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    out = engine.generate(PROMPTS, greedy(logprobs=True))
    assert engine.last_path == "lean", engine.fallback_reason
    assert torch.equal(out["response_ids"], generate_greedy(model, out))
    assert len(set(out["response_mask"].sum(1).tolist())) > 1  # rows of different lengths
    hf = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS, fast_path=False).generate(PROMPTS, greedy(logprobs=True))
    # bit for bit with one thread; with several, BLAS may split the fused and the separate matmuls' reductions
    # differently, so the log-probs agree to float rounding
    assert torch.allclose(out["sampling_logprobs"], hf["sampling_logprobs"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ],
)
def test_lean_forward_follows_the_models_rope_scaling(rope):
    """cos/sin come from the model's own rotary module: with scaled RoPE variants (dynamic NTK with positions
    past max_position_embeddings = 16, so its frequencies change during decoding) greedy still equals
    ``generate`` and the log-probs equal the HF forward's bit for bit -- and differ from unscaled RoPE's."""
    params = greedy(max_new=24, logprobs=True)
    model = tiny_model(seed=3, rope_parameters={"rope_theta": 10000.0, **rope}, max_position_embeddings=16)
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    out = engine.generate(PROMPTS, params)
    assert engine.last_path == "lean", engine.fallback_reason
    assert torch.equal(out["response_ids"], generate_greedy(model, out))
    hf = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS, fast_path=False).generate(PROMPTS, params)
    assert torch.allclose(out["sampling_logprobs"], hf["sampling_logprobs"], rtol=0, atol=1e-5)  # bitwise with 1 thread
    plain = tiny_model(seed=3, max_position_embeddings=16)
    unscaled = HFEngine(plain, pad_token_id=PAD, eos_token_id=EOS).generate(PROMPTS, params)
    assert not torch.equal(unscaled["sampling_logprobs"], out["sampling_logprobs"])


@pytest.mark.parametrize("arch, autocast", [("llama", False), ("qwen2", False), ("llama", True)])
def test_lean_forward_equals_the_hf_forward_when_sampling(arch, autocast):
    """Same seed, sampling with top-k/top-p, n=3, log-probs: the lean forward and the model's own forward give
    identical tokens and bit-identical sampling log-probs (same matmuls, same SDPA calls, same RoPE), also
    under bf16 autocast (how the online trainer generates with mixed_precision=bf16). The Q/K weights are
    scaled up so that attention is far from uniform (random init leaves it nearly flat)."""
    model = tiny_model(seed=4, arch=arch)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20.0)
            layer.self_attn.k_proj.weight.mul_(20.0)
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, n=3, max_new_tokens=20, seed=11, logprobs=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        lean = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate(PROMPTS, params)
        hf = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS, fast_path=False).generate(PROMPTS, params)
    assert torch.equal(lean["response_ids"], hf["response_ids"])
    assert torch.allclose(
        lean["sampling_logprobs"], hf["sampling_logprobs"], rtol=0, atol=1e-5
    )  # bitwise with 1 thread
    assert lean["finish_reason"] == hf["finish_reason"]


@pytest.mark.parametrize("fast_path", [True, False])
def test_shared_prefix_prefill_equals_repeated_prompts(model, fast_path):
    """n=4 prefills each prompt once and repeats its cache rows; passing every prompt 4 times with n=1
    prefills 24 rows. Same seed, same row order: identical tokens and log-probs (sampling), and the lm_head
    hook shows 6 vs 24 prefill rows."""
    params = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 16, "seed": 5, "logprobs": True}
    sizes = []
    hook = model.lm_head.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS, fast_path=fast_path)
        shared = engine.generate(PROMPTS, SamplingParams(n=4, **params))
        first = sizes[0]
        sizes.clear()
        repeated = engine.generate([p for p in PROMPTS for _ in range(4)], SamplingParams(n=1, **params))
    finally:
        hook.remove()
    assert (first, sizes[0]) == (len(PROMPTS), 4 * len(PROMPTS))
    assert torch.equal(shared["response_ids"], repeated["response_ids"])
    assert torch.allclose(
        shared["sampling_logprobs"], repeated["sampling_logprobs"], rtol=0, atol=1e-5
    )  # bitwise with 1 thread
    assert len({tuple(r) for r in shared["response_ids"][:4].tolist()}) > 1  # the 4 samples do differ


def test_lean_forward_reads_updated_weights():
    """The RL actor changes its weights between generate calls (in place, as an optimizer does): the next
    call must use the new weights, fused Q/K/V and gate/up included."""
    model = tiny_model(seed=5)
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    before = engine.generate(PROMPTS, greedy())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(3.0)
            layer.mlp.up_proj.weight.add_(0.2)
    after = engine.generate(PROMPTS, greedy())
    assert engine.last_path == "lean"
    assert not torch.equal(before["response_ids"], after["response_ids"])
    assert torch.equal(after["response_ids"], generate_greedy(model, after))


def test_unsupported_models_fall_back_to_the_hf_forward():
    """GPT-2 (another architecture), a mistral whose sliding window (8) is shorter than prompt + new tokens,
    a PEFT-wrapped llama (class PeftModel) and the LoRA-injected llama inside it (random, non-zero LoRA weights)
    all run the
    model's own forward, say why, and still equal ``generate`` -- which a lean forward that ignored the LoRA
    layers or the window would not."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
    ).eval()
    window = tiny_model(seed=6, arch="mistral", sliding_window=8)
    lora = get_peft_model(
        tiny_model(seed=7), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    ).eval()
    cases = [
        (gpt2, "GPT2LMHeadModel"),
        (window, "sliding window 8"),
        (lora, "PeftModel"),
        (lora.base_model.model, "not a plain nn.Linear"),
    ]
    for net, why in cases:
        engine = HFEngine(net, pad_token_id=PAD, eos_token_id=EOS)
        out = engine.generate(PROMPTS, greedy())
        assert engine.last_path == "hf" and why in engine.fallback_reason
        assert torch.equal(out["response_ids"], generate_greedy(net, out))
    assert unsupported_reason(tiny_model(), 10) is None
    assert "LlamaModel" in unsupported_reason(tiny_model().model, 10)  # a base model without its LM head


def test_lean_forward_without_fusion_is_the_same(model, monkeypatch):
    """Large models skip the fused Q/K/V and gate/up copies (FUSE_MAX_BYTES = 0 forces that here): the same
    tokens and bit-identical log-probs as with fusion, and no fused weights were built."""
    from alignflow.rollout import lean

    params = SamplingParams(temperature=0.9, top_k=30, max_new_tokens=16, seed=2, logprobs=True, n=2)
    fused = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate(PROMPTS, params)
    assert all(layer.w_qkv is not None for layer in lean.LeanRunner(model, width=4, max_new=4).layers)
    monkeypatch.setattr(lean, "FUSE_MAX_BYTES", 0)
    runner = lean.LeanRunner(model, width=4, max_new=4)
    assert all(layer.w_qkv is None and layer.w_gu is None for layer in runner.layers)
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    separate = engine.generate(PROMPTS, params)
    assert engine.last_path == "lean"
    assert torch.equal(fused["response_ids"], separate["response_ids"])
    assert torch.allclose(
        fused["sampling_logprobs"], separate["sampling_logprobs"], rtol=0, atol=1e-5
    )  # bitwise with 1 thread
