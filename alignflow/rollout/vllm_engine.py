"""The vLLM rollout engine: the :class:`~alignflow.rollout.engine.RolloutEngine` protocol on top of ``vllm.LLM``.

Used when ``rollout.backend: vllm`` (GPU only; ``pip install 'alignflow[vllm]'``). ``VLLMEngine.generate`` takes
the same token-id prompts and :class:`~alignflow.rollout.SamplingParams` as :class:`~alignflow.rollout.HFEngine`
and returns a :class:`~alignflow.batch.Batch` with the same fields and layout (left-padded prompts, right-padded
responses, int64 masks, position ids, ``sampling_logprobs``, meta ``prompt_index`` / ``finish_reason``). The
translations either way are small functions on plain objects (:func:`vllm_request_kwargs`,
:func:`outputs_to_batch`), tested without vLLM.

Weights. In the colocated (hybrid-engine) layout the engine lives in the actor's process and its weights are the
actor's: :meth:`VLLMEngine.sync_weights` pushes ``(name, tensor)`` pairs with Hugging Face names (from
:func:`actor_weights`: a sharded actor's full weights, LoRA adapters merged) into vLLM's model through
``LLM.collective_rpc`` and a worker extension (:class:`VLLMWorkerExtension`) that calls the model's own
``load_weights``, the path of vLLM's RLHF examples. With one GPU the engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set unless the user set it), so the tensors are handed over without a copy;
with tensor parallelism they travel to the worker processes as CPU tensors, in chunks of ``SYNC_CHUNK_BYTES``.
The prefix cache is reset after every sync (its KV blocks were computed with the old weights).

Sleep mode (``enable_sleep_mode``): between generations the engine releases its GPU memory for training.
``sleep(level=1)`` offloads the weights to CPU and drops the KV cache; ``sleep(level=2)`` drops both -- the role
uses level 2, because it pushes the actor's weights before every generation anyway. ``sync_weights`` wakes the
weights only (so the KV cache is not allocated while the new weights arrive), ``generate`` wakes the rest.

Log-probabilities. vLLM reports, per ``logprobs_mode``, either the raw model distribution (``raw_logprobs``, its
default: temperature NOT applied) or the distribution the token was actually drawn from (``processed_logprobs``:
after repetition penalty, temperature, min-p, top-k and top-p). We use ``processed_logprobs``: with the default RL
sampling (no penalty, no truncation) it is ``log_softmax(logits / T)`` -- exactly what ``HFEngine`` reports and
what the trainer recomputes -- and under truncation it is still the behaviour policy's true log-probability,
which is what a truncated-importance-sampling correction needs. (``HFEngine`` reports the untruncated tempered
value in every case; the two differ only when top-k/top-p/min-p/repetition penalty are on.) Greedy rows get the
log-softmax of the (penalised) logits at temperature 1, as in ``HFEngine``. vLLM computes in bf16 with its own
kernels, so these values differ from the trainer's by rounding: the online trainer therefore recomputes the old
log-probs (``algo.old_logprobs`` auto resolves to ``recompute``; ``sampling`` is refused).

Seeding. vLLM seeds each request's own generator; with ``n > 1`` child j of a request with seed s uses seed s + j.
Each prompt's request seed is a 62-bit hash of ``SamplingParams.seeds[i]`` (or of ``(seed, i)``), so prompts never
share a noise stream and a prompt's samples do not depend on which worker or batch it lands in. The streams are
vLLM's, not ``HFEngine``'s: the same seed gives different (equally distributed) samples in the two engines.

Multi-turn episodes (``env.*``, docs/multiturn_rl.md). A step's episodes are one weight sync, one ``generate``
per turn over the token ids of the conversations so far (each with the room it has left as its ``max_tokens``),
then one sleep: nothing resets the cache between turns, so with automatic prefix caching on
(``enable_prefix_caching``, ``rollout.enable_prefix_caching``, on by default) a turn finds the KV blocks of the
previous turn's prompt and response in the cache and prefills only the observation and the last partial block.

Version assumptions (vLLM >= 0.10.2, the V1 engine): ``LLM(logprobs_mode=..., worker_extension_cls=...,
enable_sleep_mode=..., enable_prefix_caching=...)``, ``LLM.generate(list[TokensPrompt], list[SamplingParams],
use_tqdm=False)``, ``LLM.collective_rpc(method, args=...)``, ``LLM.sleep(level)``, ``LLM.wake_up(tags=[...])``,
``LLM.reset_prefix_cache()``; ``RequestOutput.outputs[j]`` with ``index``, ``token_ids``, ``logprobs`` (a list of
``{token_id: Logprob(logprob=...)}``), ``finish_reason`` ("stop" | "length" | "abort") and ``stop_reason`` (None for
EOS, the stop token id, or the stop string); the worker's model at ``model_runner.get_model()`` (or
``model_runner.model`` in older workers) with ``load_weights(weights=[(name, tensor), ...])``.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError
from alignflow.models.backbone import unwrap
from alignflow.rollout.engine import pad_responses, rollout_tensors, validate_prompt_ids
from alignflow.rollout.sampling import SamplingParams

if TYPE_CHECKING:
    from alignflow.config import RolloutConfig

VLLM_MISSING = "rollout.backend=vllm needs vLLM: pip install 'alignflow[vllm]' (GPU only)"
LOGPROBS_MODE = "processed_logprobs"  # see the module docstring
EXTENSION = "alignflow.rollout.vllm_engine.VLLMWorkerExtension"
SYNC_CHUNK_BYTES = 512 * 2**20  # weights per collective_rpc call (bounds the extra memory of a CPU hand-over)
_SEED_MASK = 2**62 - 1
CACHED_TOKENS = "cached_prompt_tokens"  # meta of a generated batch: prompt tokens vLLM took from its prefix cache


class VLLMUnavailableError(ConfigError, ImportError):
    """``rollout.backend=vllm`` without an importable vLLM (an ImportError and a ConfigError)."""


def import_vllm() -> Any:  # the vllm module (untyped: Any)
    """The ``vllm`` module, or :class:`VLLMUnavailableError` saying how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise VLLMUnavailableError(f"{VLLM_MISSING} ({e})") from e
    return vllm


# ----------------------------------------------------------------------------------------------- our params -> vLLM
def _mix(*values: int) -> int:
    """A 62-bit hash of integers (splitmix64 finaliser over a running combination): request seeds that are far
    apart, so that vLLM's child seeds ``s + j`` of different prompts never coincide."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & _SEED_MASK


def request_seeds(params: SamplingParams, prompts: int) -> list[int | None]:
    """The vLLM seed of each prompt's request: a hash of ``seeds[i]`` (independent of the other prompts), else of
    ``(seed, i)``, else None (vLLM's engine-wide generator)."""
    seeds = getattr(params, "seeds", None)
    if seeds is not None:
        if len(seeds) != prompts:
            raise ConfigError(
                f"VLLMEngine.generate: SamplingParams.seeds has {len(seeds)} seeds for {prompts} "
                "prompts; give exactly one seed per prompt"
            )
        return [_mix(s) for s in seeds]
    if params.seed is not None:
        return [_mix(params.seed, i) for i in range(prompts)]
    return [None] * prompts


def vllm_request_kwargs(params: SamplingParams, eos_ids: Sequence[int], seed: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one prompt's request under our ``params``.

    ``top_k`` 0 (ours: disabled) becomes -1 (vLLM's "disabled", accepted by every version). Every EOS id of ours
    is added to ``stop_token_ids`` (vLLM stops by itself only on its tokenizer's EOS and the generation config's),
    so rows end on the same ids as in ``HFEngine``; :func:`finish_reason` maps them back to "eos". Detokenisation
    runs only when stop strings need it, on the text with special tokens kept (as ``HFEngine`` checks them).
    ``logprobs=0``: the chosen token's log-prob only.
    """
    stop_ids = sorted({int(t) for t in params.stop_token_ids} | {int(t) for t in eos_ids})
    return {
        "n": params.n,
        "temperature": 0.0 if params.greedy else float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": params.top_k if params.top_k > 0 else -1,
        "min_p": float(params.min_p),
        "repetition_penalty": float(params.repetition_penalty),
        "max_tokens": params.max_new_tokens,
        "stop": list(params.stop_strings) or None,
        "stop_token_ids": stop_ids,
        "detokenize": bool(params.stop_strings),
        "skip_special_tokens": False,
        "logprobs": 0 if params.logprobs else None,
        "seed": seed,
    }


# ----------------------------------------------------------------------------------------------- vLLM outputs -> Batch
def finish_reason(completion: Any, eos_ids: Sequence[int], stop_ids: Sequence[int], where: str) -> str:
    """Our finish reason ("eos" | "stop" | "length") of one vLLM ``CompletionOutput``.

    vLLM says "stop" with ``stop_reason`` None for the tokenizer's EOS, the token id for a stop token (an extra EOS
    id of ours counts as "eos") and the string for a stop string. It checks the length cap before the stop tokens,
    so a row whose last allowed token is an EOS or stop id says "length" there; ``HFEngine`` calls that "eos" /
    "stop", and so do we.
    """
    reason, last = completion.finish_reason, (int(completion.token_ids[-1]) if len(completion.token_ids) else None)
    if reason == "length":
        return "eos" if last in eos_ids else "stop" if last in stop_ids else "length"
    if reason == "stop":
        stop = getattr(completion, "stop_reason", None)
        return "eos" if stop is None or (isinstance(stop, int) and stop in eos_ids) else "stop"
    raise RuntimeError(
        f"VLLMEngine: vLLM ended {where} with finish_reason={reason!r} (expected 'stop' or 'length'); "
        "the request was aborted or failed"
    )


def _chosen_logprobs(completion: Any, tokens: list[int], where: str) -> list[float]:
    """The log-prob vLLM reported for each chosen token (``logprobs[t][tokens[t]].logprob``)."""
    entries = completion.logprobs
    if entries is None or len(entries) < len(tokens):
        raise RuntimeError(f"VLLMEngine: vLLM returned no log-prob for every token of {where} (asked logprobs=0)")
    out = []
    for t, tok in enumerate(tokens):
        entry = entries[t].get(tok) if hasattr(entries[t], "get") else None
        if entry is None:
            raise RuntimeError(f"VLLMEngine: vLLM's log-probs of {where}, position {t} lack the chosen token {tok}")
        out.append(float(entry.logprob))
    return out


def outputs_to_batch(
    outputs: Sequence[Any],
    prompt_ids: Sequence[Sequence[int]],
    n: int,
    pad_id: int,
    eos_ids: Sequence[int],
    stop_ids: Sequence[int] = (),
    with_logprobs: bool = True,
    device: torch.device | str = "cpu",
) -> Batch:
    """vLLM's ``RequestOutput`` list (one per prompt, in prompt order) -> our rollout Batch.

    The layout is exactly :meth:`HFEngine.generate`'s (tested against it): rows i*n .. i*n+n-1 are prompt i's
    samples (vLLM's ``index`` order); prompt_ids (B, Tp) left-padded with ``pad_id``, prompt_mask; response_ids
    (B, Tr) right-padded with ``pad_id``, response_mask 1 on the generated tokens (the ending EOS / stop token
    included); input_ids and attention_mask the concatenations; position_ids = cumsum(attention_mask) - 1 (0 on
    padding); sampling_logprobs (B, Tr), 0 on padding, when ``with_logprobs``; meta prompt_index, finish_reason,
    and ``CACHED_TOKENS`` (the prompt's ``num_cached_tokens``: prompt tokens found in the prefix cache, not
    prefilled) when vLLM reports it.
    """
    if len(outputs) != len(prompt_ids):
        raise RuntimeError(f"VLLMEngine: vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
    tokens, reasons, logprobs = [], [], []
    for i, request in enumerate(outputs):
        samples = sorted(request.outputs, key=lambda c: getattr(c, "index", 0))
        if len(samples) != n:
            raise RuntimeError(f"VLLMEngine: vLLM returned {len(samples)} samples for prompt {i}, expected n={n}")
        for j, c in enumerate(samples):
            ids, where = [int(t) for t in c.token_ids], f"prompt {i}, sample {j}"
            tokens.append(ids)
            reasons.append(finish_reason(c, eos_ids, stop_ids, where))
            if with_logprobs:
                logprobs.append(_chosen_logprobs(c, ids, where))
    width_p, width_r = max(len(p) for p in prompt_ids), max((len(t) for t in tokens), default=0)
    prompt = torch.tensor([[pad_id] * (width_p - len(p)) + [int(t) for t in p] for p in prompt_ids], dtype=torch.long)
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompt_ids], dtype=torch.long)
    prompt, prompt_mask = prompt.repeat_interleave(n, dim=0), prompt_mask.repeat_interleave(n, dim=0)  # (B, Tp)
    response, response_mask = pad_responses(tokens, pad_id)  # (B, Tr)
    tensors = rollout_tensors(prompt, prompt_mask, response, response_mask)
    if with_logprobs:
        lp = torch.tensor([row + [0.0] * (width_r - len(row)) for row in logprobs], dtype=torch.float32)
        tensors["sampling_logprobs"] = lp.reshape(len(tokens), width_r)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    meta: dict[str, list[Any]] = {"prompt_index": [r // n for r in range(len(tokens))], "finish_reason": reasons}
    cached = [getattr(request, "num_cached_tokens", None) for request in outputs]
    if any(c is not None for c in cached):  # prefix-cache hits, as vLLM reports them (per prompt)
        meta[CACHED_TOKENS] = [None if c is None else int(c) for c in cached for _ in range(n)]
    return Batch(tensors, meta)


# ----------------------------------------------------------------------------------------------- actor -> weights
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
_ADAPTER_MARKS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective: every rank must ask for the same tensors in the same order)."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _lora_layers(model: torch.nn.Module) -> dict[str, Any]:  # name -> peft LoraLayer
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _merged(layer: Any, value: torch.Tensor) -> torch.Tensor:
    """``W + sum_a delta_a`` over the layer's active adapters (peft's ``get_delta_weight``: scale * B @ A), computed
    into a new tensor: the actor's own weights are not touched (merge/unmerge in place would drift by rounding)."""
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return value
    for adapter in layer.active_adapters:
        if adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_embedding_A", {}):
            value = value + _full(layer.get_delta_weight(adapter)).to(value.dtype)
    return value


def actor_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The actor's current weights as ``(name, tensor)`` with the Hugging Face checkpoint names vLLM's
    ``load_weights`` expects: wrapper prefixes (``torch.compile``, activation checkpointing) removed, a peft
    model's LoRA adapters merged into their base weights (adapter tensors not sent), an FSDP2-sharded parameter
    gathered (call it inside :func:`alignflow.distributed.shard.gathered`, where the parameters are already full;
    otherwise each one is all-gathered here). Tensors are detached views of the live weights where possible.
    """
    base = unwrap(model)
    layers = _lora_layers(base)
    for name, param in base.named_parameters():
        for seg in _WRAPPER_SEGMENTS:
            name = name.replace(seg, "")
        if "modules_to_save." in name or "original_module." in name or "lora_magnitude_vector" in name:
            raise ConfigError(
                f"rollout.backend=vllm: cannot merge the peft parameter {name!r} (modules_to_save / "
                "DoRA are not supported); use plain LoRA or rollout.backend=builtin"
            )
        if layers and any(mark in name for mark in _ADAPTER_MARKS):
            continue
        value = _full(param.detach())
        if ".base_layer." in name:
            owner, leaf = name.rsplit(".base_layer.", 1)
            value = _merged(layers[owner], value) if leaf == "weight" and owner in layers else value
            name = f"{owner}.{leaf}"
        yield name, value


def chunk_by_bytes(
    named: Iterable[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive ``(name, tensor)`` pairs grouped into lists of at most ``max_bytes`` (a larger tensor alone)."""
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, t))
        size += nbytes
    if chunk:
        yield chunk


def export_model_dir(model: torch.nn.Module, tokenizer: Any, path: str | Path) -> Path:
    """Write what vLLM needs to build the actor's architecture -- ``config.json`` (with ``architectures``), the
    generation config and the tokenizer -- without the weights (the engine starts with ``load_format="dummy"``
    and receives the actor's weights through :meth:`VLLMEngine.sync_weights`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    base = unwrap(model)
    config: Any = copy.deepcopy(base.config)  # a transformers PretrainedConfig
    if not getattr(config, "architectures", None):
        config.architectures = [type(base).__name__]
    config.save_pretrained(path)
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


class VLLMWorkerExtension:
    """Mixed into vLLM's GPU worker (``worker_extension_cls``); reached with ``LLM.collective_rpc``."""

    model_runner: Any  # the vLLM worker's, once this class is mixed into it

    def alignflow_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Load ``[(hf_name, tensor), ...]`` into this worker's model (its ``load_weights`` shards them under tensor
        parallelism and casts them to the engine's dtype). Returns how many tensors were given."""
        runner = self.model_runner
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model  # get_model: no graph wrapper
        model.load_weights(weights=weights)
        return len(weights)


# ----------------------------------------------------------------------------------------------- the engine
def _validate_prompts(prompt_ids: object) -> None:
    validate_prompt_ids(prompt_ids, "VLLMEngine")


def _prompt_caps(caps: Sequence[int] | None, limit: int, prompts: int) -> list[int]:
    """Each prompt's ``max_tokens``: ``caps`` (checked: one integer in [1, limit] per prompt), else ``limit``."""
    if caps is None:
        return [limit] * prompts
    caps = list(caps)
    if len(caps) != prompts or not all(
        isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= limit for c in caps
    ):
        raise ValueError(
            f"VLLMEngine.generate: max_new_tokens must give one integer in [1, {limit}] "
            f"(params.max_new_tokens) for each of the {prompts} prompts, got {caps!r}"
        )
    return caps


def _special_ids(
    tokenizer: Any,
    model: torch.nn.Module | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> tuple[list[int], int]:
    """(EOS ids, pad id) from the same sources, in the same order, as ``HFEngine``."""
    eos = eos_token_id
    gen_cfg = getattr(model, "generation_config", None) if model is not None else None
    for source in (tokenizer, gen_cfg, getattr(model, "config", None)):
        if eos is None and source is not None:
            eos = getattr(source, "eos_token_id", None)
    if eos is None:
        raise ValueError("VLLMEngine: no EOS id found; pass eos_token_id=... (or a tokenizer that has one)")
    eos_ids = [int(e) for e in ([eos] if isinstance(eos, int) else eos)]
    pad = pad_token_id
    for source in (tokenizer, gen_cfg):
        if pad is None and source is not None:
            pad = getattr(source, "pad_token_id", None)
    return eos_ids, int(eos_ids[0] if pad is None else pad)


class VLLMEngine:
    """Rollout engine over ``vllm.LLM`` (see the module docstring); the same ``generate`` protocol as ``HFEngine``.

    model_name_or_path: a model directory or hub id vLLM loads (``load_format="dummy"``: only its config, the
    weights then come from :meth:`sync_weights`). tokenizer: the source of the EOS and pad ids (or pass
    ``eos_token_id`` / ``pad_token_id``). gpu_memory_utilization, tensor_parallel_size, dtype, max_model_len (None:
    the model's), seed (engine-wide, for requests without a seed): passed to ``vllm.LLM``. enable_sleep_mode:
    allow :meth:`sleep` / :meth:`wake_up`. enable_prefix_caching: vLLM's automatic prefix caching (a request
    whose token ids start with those of an earlier request or response reuses their KV blocks instead of
    prefilling them again: the n samples of a prompt, and each turn of a multi-turn episode after the first).
    device: where the returned tensors go. Further keyword arguments go to ``vllm.LLM`` as they are (e.g.
    ``enforce_eager=True``).
    """

    per_prompt_max_new_tokens = True  # generate(..., max_new_tokens=[cap per prompt]) (multi-turn budgets)

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer: Any = None,
        *,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        enable_sleep_mode: bool = False,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,
        seed: int = 0,
        load_format: str = "auto",
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        device: torch.device | str = "cpu",
        **engine_kwargs: Any,
    ) -> None:
        vllm = import_vllm()
        self.eos_ids, self.pad_id = _special_ids(tokenizer, None, eos_token_id, pad_token_id)
        self.tokenizer, self.device, self.enable_sleep_mode = tokenizer, torch.device(device), enable_sleep_mode
        # One GPU: run the engine core in this process so that collective_rpc hands the actor's tensors over
        # without serialising them (the user's own setting wins).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._cpu_handover = tensor_parallel_size > 1 or os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0"
        self.llm = vllm.LLM(
            model=str(model_name_or_path),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            enable_prefix_caching=enable_prefix_caching,
            max_model_len=max_model_len or None,
            seed=seed,
            load_format=load_format,
            logprobs_mode=LOGPROBS_MODE,
            worker_extension_cls=EXTENSION,
            **engine_kwargs,
        )
        self._awake = {"weights", "kv_cache"}
        self._weights_valid = load_format != "dummy"  # dummy weights are random until the first sync

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, **kwargs: Any) -> VLLMEngine:
        """An engine with ``model``'s architecture (config and tokenizer exported to a temporary directory, removed
        with the engine), EOS/pad ids found as ``HFEngine`` finds them; weights arrive with :meth:`sync_weights`."""
        import_vllm()  # before writing anything
        eos_ids, pad_id = _special_ids(tokenizer, unwrap(model))
        path = tempfile.mkdtemp(prefix="alignflow-vllm-")
        export_model_dir(model, tokenizer, path)
        engine = cls(path, tokenizer, load_format="dummy", eos_token_id=eos_ids, pad_token_id=pad_id, **kwargs)
        weakref.finalize(engine, shutil.rmtree, path, True)
        return engine

    @classmethod
    def from_config(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        cfg: RolloutConfig,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> VLLMEngine:
        """:meth:`from_model` with the vLLM options of a ``RolloutConfig`` (``rollout.*``)."""
        return cls.from_model(
            model,
            tokenizer,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            dtype=cfg.dtype,
            enable_sleep_mode=cfg.enable_sleep_mode,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_model_len=cfg.max_model_len or None,
            seed=seed,
            device=device,
        )

    # ------------------------------------------------------------------------------------------- memory
    def sleep(self, level: int = 1) -> None:
        """Release the engine's GPU memory: level 1 offloads the weights to CPU and drops the KV cache, level 2
        drops both (the next :meth:`sync_weights` must then push every weight before generating)."""
        if not self.enable_sleep_mode:
            raise RuntimeError(
                "VLLMEngine.sleep: the engine was built with enable_sleep_mode=False (rollout.enable_sleep_mode)"
            )
        if level not in (1, 2):
            raise ValueError(f"VLLMEngine.sleep: level must be 1 or 2, got {level!r}")
        self.llm.sleep(level=level)
        self._awake = set()
        if level == 2:
            self._weights_valid = False

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate what :meth:`sleep` released: ``tags`` among "weights", "kv_cache" (None: both)."""
        wanted = ["weights", "kv_cache"] if tags is None else list(tags)
        missing = [t for t in wanted if t not in self._awake]
        if missing:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the trainer's cached blocks, so that vLLM can map its memory again
            self.llm.wake_up(tags=missing)
            self._awake.update(missing)

    # ------------------------------------------------------------------------------------------- weights
    def sync_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int = SYNC_CHUNK_BYTES
    ) -> int:
        """Load ``(hf_name, tensor)`` pairs (e.g. :func:`actor_weights`) into the engine's model; wakes the weights
        first when asleep and resets the prefix cache after. Returns the number of tensors loaded."""
        self.wake_up(["weights"])
        count = 0
        for chunk in chunk_by_bytes(named_tensors, chunk_bytes):
            if self._cpu_handover:
                chunk = [(name, t.detach().to("cpu")) for name, t in chunk]
            count += int(self.llm.collective_rpc("alignflow_load_weights", args=(chunk,))[0])
        if count == 0:
            raise ValueError("VLLMEngine.sync_weights: no weights given")
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the previous weights
        self._weights_valid = True
        return count

    # ------------------------------------------------------------------------------------------- generation
    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, max_new_tokens: Sequence[int] | None = None
    ) -> Batch:
        """Sample ``params.n`` responses per prompt; the Batch of :meth:`HFEngine.generate` (see
        :func:`outputs_to_batch`), ``sampling_logprobs`` being vLLM's processed log-probs (module docstring).
        ``max_new_tokens``: one cap per prompt, each in [1, params.max_new_tokens], instead of the shared
        ``params.max_new_tokens`` (a multi-turn turn gives each conversation the room it has left)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"VLLMEngine.generate: params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        _validate_prompts(prompt_ids)
        caps = _prompt_caps(max_new_tokens, params.max_new_tokens, len(prompt_ids))
        if not self._weights_valid:
            raise RuntimeError(
                "VLLMEngine.generate: the engine holds no valid weights (dummy initial weights, or "
                "discarded by sleep(level=2)); call sync_weights first"
            )
        self.wake_up()
        import vllm
        from vllm.inputs import TokensPrompt

        seeds = request_seeds(params, len(prompt_ids))
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]
        sampling = [
            vllm.SamplingParams(**(vllm_request_kwargs(params, self.eos_ids, s) | {"max_tokens": cap}))
            for s, cap in zip(seeds, caps, strict=True)
        ]
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        return outputs_to_batch(
            outputs,
            prompt_ids,
            params.n,
            self.pad_id,
            self.eos_ids,
            stop_ids=params.stop_token_ids,
            with_logprobs=params.logprobs,
            device=self.device,
        )

    def generate_from(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        prompt_ids: list[list[int]],
        params: SamplingParams,
        sleep_level: int = 2,
    ) -> Batch:
        """The colocated step: push the actor's current weights, generate, then (sleep mode) free the GPU memory
        for training. Level 2 by default: the weights are pushed again before the next generation anyway."""
        self.sync_weights(named_tensors)
        out = self.generate(prompt_ids, params)
        if self.enable_sleep_mode:
            self.sleep(level=sleep_level)
        return out
