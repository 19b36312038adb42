"""The vLLM rollout backend without vLLM (it needs a GPU): the install hint when vLLM is missing, our sampling
parameters -> vLLM's request arguments, vLLM-shaped outputs -> the Batch (hand example, and identical to HFEngine's
batch for the same tokens), the actor's weights as vLLM wants them (plain, LoRA merged, FSDP2-sharded on 2 ranks),
the engine's orchestration (weight sync, sleep / wake-up, prefix-cache reset) against a stand-in ``vllm`` module
whose "GPU worker" is a Hugging Face model, the Rollout role on that backend, and the config checks."""

from __future__ import annotations

import copy
import importlib
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from alignflow.batch import Batch
from alignflow.config import ConfigError, RLConfig, RolloutConfig, from_dict
from alignflow.rollout import HFEngine, SamplingParams
from alignflow.rollout.vllm_engine import (
    EXTENSION,
    LOGPROBS_MODE,
    VLLM_MISSING,
    VLLMEngine,
    VLLMUnavailableError,
    actor_weights,
    chunk_by_bytes,
    export_model_dir,
    finish_reason,
    outputs_to_batch,
    request_seeds,
    vllm_request_kwargs,
)
from alignflow.trainers.rl import reuse_sampling_logprobs
from alignflow.trainers.rl_algos import resolve
from alignflow.trainers.roles import Rollout
from tests.dist_helpers import run_ranks
from tests.test_rollout import EOS, PAD, PROMPTS, tiny_model, word_tokenizer

# The stand-in vllm module generates each prompt on its own (no padding), the reference HFEngine a left-padded
# batch: the same tokens, log-probs equal to float32 rounding (up to ~1e-4 on the perturbed model).
LOGPROB_ATOL = 1e-4
TENSOR_KEYS = [
    "prompt_ids",
    "prompt_mask",
    "response_ids",
    "response_mask",
    "input_ids",
    "attention_mask",
    "position_ids",
    "sampling_logprobs",
]


def llama(seed: int = 0) -> LlamaForCausalLM:
    """A plain random Llama (vocab 64, 2 layers, GQA), the architecture vLLM rebuilds from its config."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=EOS,
            tie_word_embeddings=False,
        )
    ).eval()


def assert_same_batch(got: Batch, want: Batch, logprob_atol: float = 0.0) -> None:
    """Same keys, dtypes, shapes and values (log-probs within ``logprob_atol``), same meta."""
    assert set(got.tensors) == set(want.tensors)
    for k in want.tensors:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        if k == "sampling_logprobs" and logprob_atol:
            assert torch.allclose(got[k], want[k], rtol=0.0, atol=logprob_atol), k
        else:
            assert torch.equal(got[k], want[k]), k
    assert got["prompt_index"] == want["prompt_index"] and got["finish_reason"] == want["finish_reason"]


# ----------------------------------------------------------------------------------------------- vLLM-shaped outputs
def completion(tokens, reason, stop_reason=None, logprobs=None, index=0):
    """A ``vllm.CompletionOutput`` look-alike with the documented attribute names."""
    return SimpleNamespace(
        index=index, token_ids=list(tokens), finish_reason=reason, stop_reason=stop_reason, logprobs=logprobs, text=""
    )


def as_vllm_outputs(batch: Batch, n: int, eos: int, max_new: int, reverse: bool = False) -> list:
    """What vLLM returns for the tokens of an HFEngine batch: per prompt a RequestOutput whose ``outputs`` carry the
    tokens, ``{token: Logprob}`` dicts (plus a distractor entry), and vLLM's own finish reasons -- "stop" with
    stop_reason None (the tokenizer's EOS) or the stop token id, and "length" whenever the cap was reached, even when
    the last token was an EOS / stop id (vLLM checks the cap first). ``reverse`` returns the samples out of order."""
    requests = []
    for i in range(len(batch) // n):
        samples = []
        for j in range(n):
            r = i * n + j
            length = int(batch["response_mask"][r].sum())
            toks = batch["response_ids"][r, :length].tolist()
            lps = [
                {
                    tok: SimpleNamespace(logprob=float(batch["sampling_logprobs"][r, t]), rank=1),
                    (tok + 1) % 64: SimpleNamespace(logprob=-99.0, rank=2),
                }
                for t, tok in enumerate(toks)
            ]
            reason = batch["finish_reason"][r]
            if length == max_new:
                samples.append(completion(toks, "length", None, lps, j))
            elif reason == "eos":
                samples.append(completion(toks, "stop", None if toks[-1] == eos else toks[-1], lps, j))
            else:
                samples.append(
                    completion(
                        toks, "stop" if reason == "stop" else "length", toks[-1] if reason == "stop" else None, lps, j
                    )
                )
        requests.append(SimpleNamespace(outputs=samples[::-1] if reverse else samples))
    return requests


# ----------------------------------------------------------------------------------------------- a stand-in vllm module
LLM_KWARGS = {
    "model",
    "tensor_parallel_size",
    "dtype",
    "gpu_memory_utilization",
    "enable_sleep_mode",
    "enable_prefix_caching",
    "max_model_len",
    "seed",
    "load_format",
    "logprobs_mode",
    "worker_extension_cls",
    "enforce_eager",
}
SAMPLING_FIELDS = {
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_tokens",
    "stop",
    "stop_token_ids",
    "detokenize",
    "skip_special_tokens",
    "logprobs",
    "seed",
}


class FakeSamplingParams:
    """``vllm.SamplingParams``: a fixed set of fields (an unknown keyword is a TypeError, as in vLLM)."""

    def __init__(self, **kw):
        unknown = set(kw) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"unexpected SamplingParams fields {unknown}")
        self.kw = kw


class FakeVllmModel:
    """vLLM's model object in a worker: ``load_weights`` with Hugging Face checkpoint names."""

    def __init__(self, model):
        self.model, self.loaded = model, []

    def load_weights(self, weights):
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"vLLM model has no weight {name!r}")
            params[name].data.copy_(tensor)
            self.loaded.append(name)
        return {name for name, _ in weights}


class FakeLLM:
    """``vllm.LLM`` run by an HFEngine: built from the exported config with random ("dummy") weights, a worker of
    the class named by ``worker_extension_cls``, and a log of the calls. Greedy/seeded sampling happens in HFEngine
    (so tokens equal HFEngine's on the same weights); the outputs are vLLM-shaped (:func:`as_vllm_outputs`)."""

    instances: list = []

    def __init__(self, model, **kw):
        assert set(kw) <= LLM_KWARGS, set(kw) - LLM_KWARGS
        self.kwargs, self.calls = dict(kw, model=model), []
        torch.manual_seed(1234)
        self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        module, name = kw["worker_extension_cls"].rsplit(".", 1)
        self.runner_model = FakeVllmModel(self.model)
        self.worker = type("Worker", (getattr(importlib.import_module(module), name),), {})()
        self.worker.model_runner = SimpleNamespace(get_model=lambda: self.runner_model)
        FakeLLM.instances.append(self)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("rpc", method))
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        return [self._one(p["prompt_token_ids"], sp.kw) for p, sp in zip(prompts, sampling_params, strict=False)]

    def _one(self, prompt, kw):
        params = SamplingParams(
            n=kw["n"],
            temperature=kw["temperature"],
            top_p=kw["top_p"],
            top_k=max(kw["top_k"], 0),
            min_p=kw["min_p"],
            repetition_penalty=kw["repetition_penalty"],
            max_new_tokens=kw["max_tokens"],
            stop_token_ids=kw["stop_token_ids"],
            stop_strings=kw["stop"] or [],
            seed=kw["seed"],
            logprobs=True,
        )
        out = HFEngine(self.model, self.tokenizer).generate([prompt], params)
        return as_vllm_outputs(out, kw["n"], self.tokenizer.eos_token_id, kw["max_tokens"])[0]


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm, inputs = types.ModuleType("vllm"), types.ModuleType("vllm.inputs")
    vllm.LLM, vllm.SamplingParams, vllm.inputs = FakeLLM, FakeSamplingParams, inputs
    inputs.TokensPrompt = lambda **kw: dict(kw)  # a TypedDict in vLLM
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    FakeLLM.instances.clear()
    return vllm


# ----------------------------------------------------------------------------------------------- missing vLLM
def test_missing_vllm_names_the_install_command(monkeypatch):
    """vLLM absent (an import of it fails): a VLLMUnavailableError -- both ImportError and ConfigError -- with the
    pip command, from the engine and from the Rollout role at construction (before any training)."""
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(VLLMUnavailableError) as err:
        VLLMEngine("some/model", eos_token_id=EOS)
    assert isinstance(err.value, ImportError) and isinstance(err.value, ConfigError)
    assert VLLM_MISSING in str(err.value) and "pip install 'alignflow[vllm]'" in str(err.value)
    with pytest.raises(ImportError, match="rollout.backend=vllm needs vLLM"):
        Rollout(llama(), word_tokenizer(), RolloutConfig(backend="vllm"), "cpu")


# ----------------------------------------------------------------------------------------------- params -> vLLM
def test_request_kwargs_mapping():
    greedy = vllm_request_kwargs(SamplingParams(temperature=0.0, max_new_tokens=7), eos_ids=[2])
    assert greedy == {
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": 7,
        "stop": None,
        "stop_token_ids": [2],
        "detokenize": False,
        "skip_special_tokens": False,
        "logprobs": None,
        "seed": None,
    }
    sampled = vllm_request_kwargs(
        SamplingParams(
            n=4,
            temperature=0.7,
            top_p=0.9,
            top_k=5,
            min_p=0.05,
            repetition_penalty=1.3,
            max_new_tokens=32,
            stop_token_ids=[9, 5],
            stop_strings=["\n\n", "###"],
            logprobs=True,
        ),
        eos_ids=[2, 7, 9],
        seed=123,
    )
    assert sampled["n"] == 4 and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and sampled["top_k"] == 5
    assert sampled["min_p"] == 0.05 and sampled["repetition_penalty"] == 1.3 and sampled["max_tokens"] == 32
    assert sampled["stop"] == ["\n\n", "###"] and sampled["detokenize"] is True  # vLLM needs text for stop strings
    assert sampled["stop_token_ids"] == [2, 5, 7, 9]  # ours + every EOS id (vLLM knows only its tokenizer's)
    assert sampled["logprobs"] == 0 and sampled["seed"] == 123  # 0: the chosen token's log-prob only


def test_request_seeds():
    """Per-prompt seeds: a hash of seeds[i] alone (the same whatever the other prompts), far apart so that vLLM's
    child seeds s + j never collide; with one `seed`, a hash of (seed, i); none: vLLM's own generator."""
    a = request_seeds(SamplingParams(seeds=[5, 9, 11]), 3)
    assert a[1:] == request_seeds(SamplingParams(seeds=[9, 11]), 2) == request_seeds(SamplingParams(seeds=[9, 11]), 2)
    assert a[0] == request_seeds(SamplingParams(seeds=[5]), 1)[0]
    assert all(0 <= s < 2**62 for s in a) and min(abs(x - y) for x in a for y in a if x != y) > 1000
    b = request_seeds(SamplingParams(seed=5), 3)
    assert len(set(b)) == 3 and b != a and b == request_seeds(SamplingParams(seed=5), 3)
    assert request_seeds(SamplingParams(), 2) == [None, None]
    with pytest.raises(ConfigError, match="one seed per prompt"):
        request_seeds(SamplingParams(seeds=[1, 2]), 3)


# ----------------------------------------------------------------------------------------------- vLLM outputs -> Batch
def test_finish_reasons():
    eos, stops = [2, 7], [30]
    assert finish_reason(completion([4, 2], "stop"), eos, stops, "") == "eos"  # the tokenizer's EOS
    assert finish_reason(completion([4, 7], "stop", 7), eos, stops, "") == "eos"  # an extra EOS id of ours
    assert finish_reason(completion([4, 30], "stop", 30), eos, stops, "") == "stop"  # a stop token id
    assert finish_reason(completion([4, 8], "stop", "w8"), eos, stops, "") == "stop"  # a stop string
    assert finish_reason(completion([4, 5], "length"), eos, stops, "") == "length"
    assert finish_reason(completion([4, 2], "length"), eos, stops, "") == "eos"  # EOS as the last allowed token
    assert finish_reason(completion([4, 30], "length"), eos, stops, "") == "stop"
    with pytest.raises(RuntimeError, match="prompt 3, sample 1 with finish_reason='abort'"):
        finish_reason(completion([4], "abort"), eos, stops, "prompt 3, sample 1")


def test_outputs_to_batch_hand_example():
    """Two prompts of lengths 3 and 1, n=2; responses of lengths 2, 1, 3, 2 (pad 0): the tensors written out."""
    lp = lambda *v: [{t: SimpleNamespace(logprob=x)} for t, x in v]  # noqa: E731
    outputs = [
        SimpleNamespace(
            outputs=[
                completion([11, 2], "stop", None, lp((11, -0.5), (2, -0.25)), 0),
                completion([12], "length", None, lp((12, -1.0)), 1),
            ]
        ),
        SimpleNamespace(
            outputs=[
                completion([13, 14, 30], "stop", 30, lp((13, -2.0), (14, -0.125), (30, -3.0)), 1),
                completion([15, 16], "stop", "w16", lp((15, -0.75), (16, -1.5)), 0),
            ]
        ),
    ]
    b = outputs_to_batch(outputs, [[5, 6, 7], [8]], n=2, pad_id=0, eos_ids=[2], stop_ids=[30])
    assert b["prompt_ids"].tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8], [0, 0, 8]]
    assert b["prompt_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 1]]
    assert b["response_ids"].tolist() == [[11, 2, 0], [12, 0, 0], [15, 16, 0], [13, 14, 30]]  # by `index`
    assert b["response_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert b["input_ids"].tolist()[2] == [0, 0, 8, 15, 16, 0]
    assert b["attention_mask"].tolist()[2] == [0, 0, 1, 1, 1, 0]
    assert b["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 0],
        [0, 1, 2, 3, 0, 0],
        [0, 0, 0, 1, 2, 0],
        [0, 0, 0, 1, 2, 3],
    ]
    assert b["sampling_logprobs"].tolist() == [
        [-0.5, -0.25, 0.0],
        [-1.0, 0.0, 0.0],
        [-0.75, -1.5, 0.0],
        [-2.0, -0.125, -3.0],
    ]
    assert b["prompt_index"] == [0, 0, 1, 1] and b["finish_reason"] == ["eos", "length", "stop", "stop"]
    assert all(b[k].dtype == torch.long for k in TENSOR_KEYS[:-1]) and b["sampling_logprobs"].dtype == torch.float32
    with pytest.raises(RuntimeError, match="1 samples for prompt 0, expected n=2"):
        outputs_to_batch([SimpleNamespace(outputs=outputs[0].outputs[:1])], [[5]], n=2, pad_id=0, eos_ids=[2])
    with pytest.raises(RuntimeError, match="lack the chosen token 11"):
        outputs_to_batch(
            [SimpleNamespace(outputs=[completion([11], "length", None, lp((3, -1.0)))])],
            [[5]],
            n=1,
            pad_id=0,
            eos_ids=[2],
        )


def test_outputs_match_hfengine_batch():
    """HFEngine's batch for a run with EOS, stop-token and length endings (n=2, log-probs on), re-expressed as vLLM
    would return those tokens (samples out of order), converts back to an identical Batch: same keys, dtypes,
    shapes, values, masks, position ids and meta."""
    model = tiny_model()
    engine = HFEngine(model, pad_token_id=PAD, eos_token_id=EOS)
    free = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=24))
    stop = next(t for t in free["response_ids"][0, 3:].tolist() if t not in (EOS, PAD))
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_new_tokens=24, stop_token_ids=[stop], logprobs=True)
    want = engine.generate(PROMPTS, params)
    assert set(want["finish_reason"]) == {"eos", "stop", "length"}  # every ending is exercised
    got = outputs_to_batch(
        as_vllm_outputs(want, 2, EOS, 24, reverse=True), PROMPTS, n=2, pad_id=PAD, eos_ids=[EOS], stop_ids=[stop]
    )
    assert_same_batch(got, want)
    assert list(got.tensors) == list(want.tensors)  # same field order too


# ----------------------------------------------------------------------------------------------- actor -> weights
def test_actor_weights_are_the_live_parameters():
    model = llama()
    sent = list(actor_weights(torch.compile(model, backend="eager")))  # the _orig_mod. prefix is dropped
    assert [n for n, _ in sent] == [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    assert all(t.data_ptr() == params[n].data_ptr() and not t.requires_grad for n, t in sent)  # no copy, detached


def test_actor_weights_merge_lora_without_touching_the_actor():
    """A peft LoRA actor (adapters on q/v, given non-zero B): the sent weights carry the base names and equal peft's
    own merge (``merge_and_unload`` of a copy); no adapter tensor is sent; the actor's base weights are unchanged."""
    from peft import LoraConfig, get_peft_model

    base = llama()
    reference = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    sent = dict(actor_weights(model))
    assert list(sent) == list(reference)
    for name, t in sent.items():
        assert torch.allclose(t, merged[name], atol=1e-6), name
    changed = [n for n in sent if not torch.equal(sent[n], reference[n])]
    assert changed and all(("q_proj" in n or "v_proj" in n) and n.endswith("weight") for n in changed)
    now = dict(model.get_base_model().named_parameters())
    assert torch.equal(
        now["model.layers.0.self_attn.q_proj.base_layer.weight"], reference["model.layers.0.self_attn.q_proj.weight"]
    )


def _sharded_weights(rank: int, world: int) -> dict:
    """On each rank: the same model sharded 2 ways; the weights sent inside ``gathered`` (the parameters are full
    there; the tensors are views of them, valid inside the block only) and outside it (each DTensor all-gathered),
    against the unsharded reference."""
    from alignflow.distributed.shard import gathered, shard

    model = llama()
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    shard(model)

    def check(sent: dict) -> tuple:
        diff = max(float((sent[n] - reference[n]).abs().max()) for n in reference)
        return list(sent), diff, all(sent[n].shape == reference[n].shape for n in reference)

    with gathered(model):
        inside = check(dict(actor_weights(model)))
    outside = check(dict(actor_weights(model)))
    return {"ref": list(reference), "inside": inside, "outside": outside}


def test_actor_weights_of_a_sharded_actor():
    for r in run_ranks(_sharded_weights, 2):
        assert r["inside"] == (r["ref"], 0.0, True) and r["outside"] == (r["ref"], 0.0, True)


def test_chunk_by_bytes():
    t = lambda k: torch.zeros(k)  # noqa: E731  (4 bytes per element)
    named = [("a", t(10)), ("b", t(10)), ("c", t(30)), ("d", t(1)), ("e", t(1))]
    chunks = list(chunk_by_bytes(named, max_bytes=80))
    assert [[n for n, _ in c] for c in chunks] == [["a", "b"], ["c"], ["d", "e"]]  # c (120 B) travels alone
    assert list(chunk_by_bytes([], 80)) == []


def test_export_model_dir(tmp_path):
    """Config (with its architecture), generation config and tokenizer; no weight file."""
    model, tok = llama(), word_tokenizer()
    path = export_model_dir(model, tok, tmp_path / "m")
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.architectures == ["LlamaForCausalLM"] and cfg.num_hidden_layers == 2 and cfg.vocab_size == 64
    assert AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("w5") == 5
    assert not list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    assert model.config.architectures is None  # the actor's own config is not modified


# ----------------------------------------------------------------------------------------------- the engine
def test_engine_syncs_weights_sleeps_and_matches_hfengine(fake_vllm):
    """From the actor: the engine starts with dummy weights (generate refuses until a sync), the sync goes through
    collective_rpc to the worker extension with the actor's names, and then greedy generation equals HFEngine's on
    the actor -- also after the actor's weights change (pushed again by generate_from). Sleep mode: weights woken
    before the sync, prefix cache reset after it, KV cache woken before generating, level-2 sleep after."""
    model, tok = llama(), word_tokenizer()
    engine = VLLMEngine.from_model(model, tok, enable_sleep_mode=True, gpu_memory_utilization=0.3, seed=7)
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["load_format"] == "dummy" and llm.kwargs["logprobs_mode"] == LOGPROBS_MODE == "processed_logprobs"
    assert llm.kwargs["worker_extension_cls"] == EXTENSION and llm.kwargs["enable_sleep_mode"] is True
    assert llm.kwargs["gpu_memory_utilization"] == 0.3 and llm.kwargs["seed"] == 7
    assert engine.eos_ids == [EOS] and engine.pad_id == PAD
    params = SamplingParams(temperature=0.0, max_new_tokens=12, logprobs=True)
    with pytest.raises(RuntimeError, match="call sync_weights first"):
        engine.generate(PROMPTS, params)

    engine.sleep(level=2)
    out = engine.generate_from(actor_weights(model), PROMPTS, params)
    assert_same_batch(out, HFEngine(model, tok).generate(PROMPTS, params), logprob_atol=LOGPROB_ATOL)
    assert llm.calls == [
        ("sleep", 2),
        ("wake_up", ("weights",)),
        ("rpc", "alignflow_load_weights"),
        ("reset_prefix_cache",),
        ("wake_up", ("kv_cache",)),
        ("generate", len(PROMPTS)),
        ("sleep", 2),
    ]
    assert llm.runner_model.loaded == [n for n, _ in model.named_parameters()]
    with pytest.raises(RuntimeError, match="call sync_weights first"):  # level 2 discarded the weights
        engine.generate(PROMPTS, params)

    with torch.no_grad():  # "an optimiser step"
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    again = engine.generate_from(actor_weights(model), PROMPTS, params)
    assert_same_batch(again, HFEngine(model, tok).generate(PROMPTS, params), logprob_atol=LOGPROB_ATOL)
    assert not torch.equal(again["sampling_logprobs"], out["sampling_logprobs"])


def test_engine_without_sleep_mode_refuses_to_sleep(fake_vllm):
    engine = VLLMEngine.from_model(llama(), word_tokenizer())
    with pytest.raises(RuntimeError, match="enable_sleep_mode=False"):
        engine.sleep()
    engine.sync_weights(actor_weights(llama()), chunk_bytes=4096)  # many small collective_rpc calls
    rpcs = [c for c in FakeLLM.instances[-1].calls if c[0] == "rpc"]
    assert len(rpcs) > 3
    with pytest.raises(ValueError, match="no weights"):
        engine.sync_weights([])


def test_rollout_role_on_the_vllm_backend(fake_vllm):
    """The Rollout role with rollout.backend=vllm returns what the builtin role returns for greedy decoding (tensors
    and decoded responses), pushing the actor's weights and sleeping around each call; sampled calls give n rows
    per prompt with the prompt rows' meta repeated."""
    model, tok = llama(), word_tokenizer()
    cfg = dict(n=3, max_new_tokens=10, temperature=1.0)
    vllm_role = Rollout(model, tok, RolloutConfig(backend="vllm", **cfg), "cpu", seed=1)
    builtin = Rollout(model, tok, RolloutConfig(**cfg), "cpu", seed=1)
    prompts = Batch(meta={"prompt": ["a", "b", "c"], "prompt_token_ids": PROMPTS[:3], "group": [4, 5, 6]})
    got, want = vllm_role.generate(prompts, greedy=True), builtin.generate(prompts, greedy=True)
    assert_same_batch(got, want, logprob_atol=LOGPROB_ATOL)
    assert got["response"] == want["response"] and got["group"] == [4, 5, 6]
    sampled = vllm_role.generate(prompts)
    assert len(sampled) == 9 and sampled["group"] == [4, 4, 4, 5, 5, 5, 6, 6, 6]
    assert sampled["sampling_logprobs"].shape == sampled["response_ids"].shape
    calls = FakeLLM.instances[-1].calls
    assert [c[0] for c in calls].count("rpc") == 2 and calls[-1] == ("sleep", 2)


# ----------------------------------------------------------------------------------------------- config
def test_config_backend_and_old_logprobs():
    """backend=vllm: old log-probs are always recomputed (auto -> recompute), and 'sampling' is refused with a
    message naming the fix; builtin keeps its rule (auto -> sampling with one update per batch)."""
    rl = lambda **sections: from_dict(RLConfig, sections)  # noqa: E731
    one_update = {"train": {"batch_size": 64, "packing": False}, "algo": {"ppo_epochs": 1}}
    assert reuse_sampling_logprobs(rl(**one_update), rows=64) is True
    assert reuse_sampling_logprobs(rl(**one_update, rollout={"backend": "vllm"}), rows=64) is False
    bad = rl(rollout={"backend": "vllm"}, algo={"old_logprobs": "sampling"})
    with pytest.raises(ConfigError, match="use algo.old_logprobs=recompute"):
        resolve(bad)  # at config time, before any model is loaded
    with pytest.raises(ConfigError, match="builtin, vllm"):
        rl(rollout={"backend": "sglang"})
    with pytest.raises(ConfigError, match="rollout.gpu_memory_utilization"):
        rl(rollout={"gpu_memory_utilization": 1.5})
    cfg = rl(
        rollout={
            "backend": "vllm",
            "tensor_parallel_size": 2,
            "max_model_len": 4096,
            "dtype": "float16",
            "enable_sleep_mode": False,
        }
    )
    assert (cfg.rollout.tensor_parallel_size, cfg.rollout.max_model_len, cfg.rollout.dtype) == (2, 4096, "float16")
