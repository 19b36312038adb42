"""Counter-based sampling noise (``SamplingParams.seeds``): the hash against a 32-bit reference, the noise is
Exp(1) and independent across rows / steps / columns, sampled tokens follow softmax, and a prompt's samples do
not depend on the batch it is generated in (alone, with others, reordered, split into calls; lean and HF
forward; the Nash-MD mixture sampler; the RL Rollout role). ``seeds=None`` keeps the single-generator stream."""

import math
import random

import pytest
import torch
from scipy import stats

from alignflow.batch import Batch
from alignflow.config import ConfigError, RolloutConfig
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.rollout.mixture import generate_mixture
from alignflow.rollout.sampling import (
    keyed_exponential,
    keyed_uniform_bits,
    mix32,
    process_logits,
    sample_from_logits,
    sample_keys,
    sample_tokens,
)
from alignflow.trainers.roles import Rollout
from tests.test_rollout import EOS, PAD, PROMPTS, tiny_model, word_tokenizer

M32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """The reference: Wellons' lowbias32 in plain 32-bit arithmetic on Python ints."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4, eos_bias=1.5)  # EOS ~7% per sampled step: rows end at different steps


def responses(out) -> list[tuple]:
    """Per row: (generated tokens without padding, finish reason); comparable across calls of any width."""
    ids, mask = out["response_ids"], out["response_mask"]
    return [(tuple(r[m.bool()].tolist()), f) for r, m, f in zip(ids, mask, out["finish_reason"], strict=False)]


def logprob_rows(out) -> list[torch.Tensor]:
    return [lp[m.bool()] for lp, m in zip(out["sampling_logprobs"], out["response_mask"], strict=False)]


# ----------------------------------------------------------------------------------------------- the hash
def test_mix32_equals_32_bit_arithmetic():
    """The int64 implementation (masks, the split multiply for the constant >= 2**31) equals lowbias32 computed
    with exact integers, edge values included; and it is a bijection on a sample (no collisions)."""
    rng = random.Random(0)
    xs = [0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF] + [rng.getrandbits(32) for _ in range(5000)]
    assert mix32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]
    out = mix32(torch.arange(200_000))
    assert out.unique().numel() == 200_000 and int(out.min()) >= 0 and int(out.max()) <= M32


def test_sample_keys_layout():
    """Row i*n + j holds the key of stream (seeds[i], j): the same key for the same (seed, j) in any call;
    all keys distinct; seeds are taken mod 2**64 (negative and huge ones are valid)."""
    keys = sample_keys([5, 9, -3], 4)
    assert keys.shape == (12, 2) and keys.dtype == torch.long
    assert int(keys.min()) >= 0 and int(keys.max()) <= M32
    assert torch.equal(keys[4:8], sample_keys([9], 4)) and torch.equal(keys[8:], sample_keys([-3 + 2**64], 4))
    assert torch.equal(keys[:2], sample_keys([5], 2))  # sample j's key does not depend on n
    assert len({tuple(k) for k in keys.tolist()}) == 12


def test_keyed_noise_is_exponential():
    """262,144 draws (64 consecutive seeds x 8 steps x 512 columns; structured inputs are the hard case for a
    weak hash): mean 1 and variance 1 within ~5 standard errors (se 0.002 and 0.0055), and the Kolmogorov-
    Smirnov distance to Exp(1) below the 0.1% critical value 1.95 / sqrt(N) = 0.0038. All draws are > 0."""
    keys = sample_keys(range(64), 1)
    noise = torch.stack([keyed_exponential(keys, t, torch.arange(512)) for t in range(8)])  # (8, 64, 512)
    e = noise.double().flatten()
    n = e.numel()
    assert abs(e.mean().item() - 1.0) < 0.01 and abs(e.var().item() - 1.0) < 0.03
    assert e.min().item() > 0.0
    x = e.sort().values
    cdf = 1.0 - torch.exp(-x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())
    assert ks < 1.95 / math.sqrt(n)


def test_keyed_noise_is_uncorrelated_across_rows_steps_columns():
    """Pearson correlation of the noise with its neighbour along each axis -- the next seed, the next sample
    index of the same seed, the next step, the next column -- and of each of the 32 hash bits' means: all
    within 4 standard errors of independence (|corr| < 4 / sqrt(N), bit mean 0.5 +- 2 / sqrt(N))."""
    cols = torch.arange(2048)
    by_seed = sample_keys(range(65), 1)  # (65, 2): seeds s and s+1
    by_index = sample_keys([7], 65)  # (65, 2): samples j and j+1 of one seed
    for keys in (by_seed, by_index):
        noise = torch.stack([keyed_exponential(keys, t, cols) for t in range(3)]).double()  # (3, 65, 2048)
        pairs = {
            "row": (noise[:, :-1], noise[:, 1:]),
            "step": (noise[:-1], noise[1:]),
            "column": (noise[..., :-1], noise[..., 1:]),
        }
        for axis, (a, b) in pairs.items():
            corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
            assert abs(corr) < 4 / math.sqrt(a.numel()), (axis, corr)
    bits = keyed_uniform_bits(by_seed, 0, cols)  # (65, 2048)
    freq = torch.stack([(bits >> k) & 1 for k in range(32)]).flatten(1).double().mean(1)  # (32,)
    assert (freq - 0.5).abs().max().item() < 2 / math.sqrt(bits.numel())


@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("across", ["rows", "steps"])
def test_keyed_sampling_matches_softmax(top_k, across):
    """20,000 keyed draws from one logits row (V = 8) under temperature / top-p / min-p / repetition penalty,
    either across 20,000 rows (different seeds) at one step or across 20,000 steps of one row: Pearson's
    chi-square of the token counts against softmax(process_logits(...)) stays below the 0.1% critical value
    (df = surviving tokens - 1), and removed tokens are never drawn. top_k=5 goes through the candidate path."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0]])
    seen = torch.tensor([[False, True, False, False, False, False, False, True]])
    params = SamplingParams(temperature=0.8, top_k=top_k, top_p=0.95, min_p=0.02, repetition_penalty=1.2)
    target = process_logits(logits, params, seen).softmax(-1)[0].double()  # (V,)
    draws = 20_000
    if across == "rows":
        tokens = sample_tokens(
            logits.expand(draws, -1), params, None, seen.expand(draws, -1), keys=sample_keys(range(draws), 1), step=3
        )
    else:
        keys = sample_keys([11], 1).expand(draws, -1)
        tokens = sample_tokens(
            logits.expand(draws, -1), params, None, seen.expand(draws, -1), keys=keys, step=torch.arange(draws)
        )
    counts = torch.bincount(tokens, minlength=8).double()
    alive = target > 0
    assert (counts[~alive] == 0).all() and (~alive).any() and alive.sum() >= 4
    expected = target[alive] * draws
    chi2 = ((counts[alive] - expected) ** 2 / expected).sum().item()
    assert chi2 < stats.chi2.ppf(0.999, int(alive.sum()) - 1)


def test_candidate_path_keys_noise_by_token_id():
    """The top-k candidate path keys the noise by token id, so with the same keys it picks exactly the token the
    full-vocabulary path picks from the same processed distribution (2,000 random rows, V = 64, top-k 10)."""
    torch.manual_seed(0)
    logits = torch.randn(2000, 64) * 2
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.9)
    keys = sample_keys(range(2000), 1)
    candidate = sample_tokens(logits, params, None, keys=keys, step=5)
    full = sample_from_logits(process_logits(logits, params), None, keys=keys, step=5)
    assert torch.equal(candidate, full)
    assert candidate.unique().numel() > 30  # rows do draw different tokens


def test_seeds_none_uses_the_generator_stream():
    """Without keys the draw is the old exponential race on one torch.Generator: argmax(p / E), E drawn with
    ``exponential_`` from the generator -- the same tokens as the formula, and different ones with keys."""
    torch.manual_seed(1)
    logits = torch.randn(500, 64)
    drawn = sample_from_logits(logits, torch.Generator().manual_seed(3))
    race = torch.empty(500, 64).exponential_(generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, (logits.softmax(-1) / race).argmax(-1))
    assert not torch.equal(drawn, sample_from_logits(logits, None, keys=sample_keys(range(500), 1)))


# ----------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize(
    "seeds, match",
    [
        ([], r"SamplingParams\.seeds: expected a non-empty list"),
        ("12", r"SamplingParams\.seeds: expected"),
        ([1, 2.5], r"SamplingParams\.seeds\[1\]: expected an integer"),
        ([True], r"SamplingParams\.seeds\[0\]"),
    ],
)
def test_seeds_validation(seeds, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(seeds=seeds)


def test_seeds_must_match_the_prompts(model):
    params = SamplingParams(seeds=[1, 2], max_new_tokens=4)
    with pytest.raises(ConfigError, match=r"HFEngine.generate: SamplingParams.seeds has 2 seeds for 6 prompts"):
        HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate(PROMPTS, params)
    with pytest.raises(ConfigError, match=r"generate_mixture: SamplingParams.seeds has 2 seeds for 6 prompts"):
        generate_mixture(model, model, PROMPTS, params, 0.5, eos_ids=[EOS], pad_id=PAD)


# ----------------------------------------------------------------------------------------------- engine
PARAMS = {"temperature": 1.0, "top_p": 0.95, "n": 3, "max_new_tokens": 16, "logprobs": True}
SEEDS = [101, 202, 303, 404, 505, 606]


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_prompts_samples_do_not_depend_on_its_batch(model, fast_path):
    """With one seed per prompt, each prompt's n samples (tokens, finish reasons, log-probs) are the same when
    generated with all six prompts, alone, in reversed order, or with the prompts split over two calls. Rows
    end early at different steps (EOS bias), so the per-row keys also survive the batch compaction. Then the
    old single-seed behaviour is shown to differ with the batch, which is what ``seeds`` fixes."""
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS, fast_path=fast_path)
    full = engine.generate(PROMPTS, SamplingParams(seeds=SEEDS, **PARAMS))
    assert engine.last_path == ("lean" if fast_path else "hf")
    rows, lps = responses(full), logprob_rows(full)
    n = PARAMS["n"]
    assert sum(f == "eos" for _, f in rows) >= 3 and sum(f == "length" for _, f in rows) >= 3
    assert len(set(rows[:n])) > 1  # a prompt's samples differ from one another

    def check(indices, out):
        got, got_lp = responses(out), logprob_rows(out)
        for k, i in enumerate(indices):
            assert got[k * n : (k + 1) * n] == rows[i * n : (i + 1) * n], (indices, i)
            for a, b in zip(got_lp[k * n : (k + 1) * n], lps[i * n : (i + 1) * n], strict=False):
                assert torch.allclose(a, b, rtol=0, atol=1e-5)

    for i in range(len(PROMPTS)):
        check([i], engine.generate([PROMPTS[i]], SamplingParams(seeds=[SEEDS[i]], **PARAMS)))
    order = list(reversed(range(len(PROMPTS))))
    check(
        order, engine.generate([PROMPTS[i] for i in order], SamplingParams(seeds=[SEEDS[i] for i in order], **PARAMS))
    )
    check([0, 1], engine.generate(PROMPTS[:2], SamplingParams(seeds=SEEDS[:2], **PARAMS)))
    check([2, 3, 4, 5], engine.generate(PROMPTS[2:], SamplingParams(seeds=SEEDS[2:], **PARAMS)))
    old_full = responses(engine.generate(PROMPTS, SamplingParams(seed=1, **PARAMS)))
    old_tail = responses(engine.generate(PROMPTS[3:], SamplingParams(seed=1, **PARAMS)))
    assert old_tail != old_full[3 * n :]


def test_keyed_sampling_is_the_same_on_the_lean_and_hf_paths(model):
    """Same seeds, top-k/top-p, n=3: the lean forward and the model's own forward give identical tokens."""
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=20, n=3, seeds=SEEDS, logprobs=True)
    lean = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate(PROMPTS, params)
    hf = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS, fast_path=False).generate(PROMPTS, params)
    assert responses(lean) == responses(hf)
    assert torch.allclose(lean["sampling_logprobs"], hf["sampling_logprobs"], rtol=0, atol=1e-5)


def test_engine_without_seeds_keeps_the_single_generator_stream(model):
    """``seeds=None``: one prompt decoded by hand (full forward each step, the same sampler on one generator
    seeded with ``seed``) gives the engine's tokens; ``seeds`` leaves torch's global RNG untouched."""
    params = SamplingParams(temperature=1.0, top_k=30, max_new_tokens=16, seed=4)
    out = responses(HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate([PROMPTS[1]], params))[0][0]
    gen, ids, manual = torch.Generator().manual_seed(4), list(PROMPTS[1]), []
    with torch.no_grad():
        for _ in range(params.max_new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[:, -1].float()
            token = int(sample_tokens(logits, params, gen)[0])
            manual.append(token)
            ids.append(token)
            if token == EOS:
                break
    assert tuple(manual) == out and len(out) > 5
    state = torch.get_rng_state()
    HFEngine(model, pad_token_id=PAD, eos_token_id=EOS).generate(PROMPTS, SamplingParams(seeds=SEEDS, **PARAMS))
    assert torch.equal(state, torch.get_rng_state())


def test_mixture_sampler_with_seeds_does_not_depend_on_the_batch(model):
    """Nash-MD's mixture sampler with seeds: each prompt's samples are the same alone as with the others."""
    ref = tiny_model(seed=5)
    params = {"temperature": 1.0, "top_k": 20, "max_new_tokens": 12, "n": 2}
    full = responses(
        generate_mixture(model, ref, PROMPTS, SamplingParams(seeds=SEEDS, **params), 0.3, eos_ids=[EOS], pad_id=PAD)
    )
    for i in (0, 4):
        alone = generate_mixture(
            model, ref, [PROMPTS[i]], SamplingParams(seeds=[SEEDS[i]], **params), 0.3, eos_ids=[EOS], pad_id=PAD
        )
        assert responses(alone) == full[2 * i : 2 * i + 2]
    assert len({r for r, _ in full}) > 6


def test_rollout_role_samples_each_prompt_from_its_group_uid(model):
    """The RL Rollout role seeds each prompt from its group uid: generating four prompts at once or as two
    halves (what two data-parallel workers do) gives the same samples for every prompt; another run seed
    changes them."""
    cfg = RolloutConfig(n=2, temperature=1.0, max_new_tokens=10)
    prompts = Batch(
        meta={"prompt": [f"p{i}" for i in range(4)], "prompt_token_ids": PROMPTS[:4], "group": [17, 18, 19, 20]}
    )
    role = Rollout(model, word_tokenizer(), cfg, "cpu", seed=3)
    whole = role.generate(prompts)
    halves = [role.generate(prompts.select(list(idx))) for idx in (range(2), range(2, 4))]
    assert whole["response"] == halves[0]["response"] + halves[1]["response"]
    assert whole["group"] == [17, 17, 18, 18, 19, 19, 20, 20]
    other = Rollout(model, word_tokenizer(), cfg, "cpu", seed=4).generate(prompts)
    assert other["response"] != whole["response"]
