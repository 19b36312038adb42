"""Rollout engines: the protocol every engine implements, and the built-in engine for Hugging Face causal LMs.

``HFEngine`` runs any ``AutoModelForCausalLM`` with a KV cache. Llama-family models (llama, mistral, qwen2,
qwen3) take the fast path, a lean forward on the model's own weights with a static KV cache (``lean.py``);
every other model, or one the lean forward cannot reproduce (PEFT-wrapped, sliding windows, ...), runs
the model's own forward with transformers' ``DynamicCache``, its full-attention layers written in place
(``kv_cache.py``). Either way:

1. prompts are left-padded and prefilled once (one forward per *distinct* prompt; with ``n > 1`` the cache
   is then repeated so rows i*n .. i*n+n-1 share prompt i);
2. each decode step feeds one token per live row, samples on-device (noise from a seeded ``torch.Generator``,
   or with ``SamplingParams.seeds`` counter-based noise keyed per row, see ``sampling.py``) and writes into
   preallocated buffers;
3. rows that end (an EOS id, a stop token id or a stop string) leave the running batch: the cache, the
   attention mask and the position ids are reduced to the unfinished rows, so later steps only compute live
   rows. The one host sync per step is the "did any row end" check (every ``compact_every`` steps); the
   only per-row Python loop is the stop-string check, and it runs only when stop strings are configured.

The returned :class:`~alignflow.batch.Batch` is documented in ``docs/rollout.md`` and in :meth:`HFEngine.generate`.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import DynamicCache

from alignflow.batch import Batch
from alignflow.rollout.graphs import GraphedLeanRunner, graphs_supported
from alignflow.rollout.kv_cache import preallocated_cache, select_rows
from alignflow.rollout.lean import LeanRunner, unsupported_reason
from alignflow.rollout.sampling import SamplingParams, chosen_logprobs, presence_mask, sample_keys, sample_tokens

FINISH_REASONS = ("length", "eos", "stop")  # finish codes 0, 1, 2 used inside the engine


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that turns prompts (token ids) into a batch of sampled responses."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Batch: ...


def validate_prompt_ids(prompt_ids: object, engine: str, vocab_size: int | None = None) -> None:
    """ValueError naming the prompt and position unless ``prompt_ids`` is a non-empty list of non-empty lists of
    token ids (in ``[0, vocab_size)`` when it is given). Every engine checks its input with this."""
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise ValueError(f"{engine}.generate: prompt_ids must be a non-empty list of token-id lists")
    high = vocab_size if vocab_size is not None else float("inf")
    for i, row in enumerate(prompt_ids):
        if not isinstance(row, (list, tuple)) or len(row) == 0:
            raise ValueError(
                f"{engine}.generate: prompt_ids[{i}] must be a non-empty list of token ids, got {row!r:.80}"
            )
        for j, tok in enumerate(row):
            if isinstance(tok, bool) or not isinstance(tok, numbers.Integral) or not 0 <= int(tok) < high:
                where = f" in [0, {vocab_size}) (the model's vocabulary)" if vocab_size is not None else ""
                raise ValueError(f"{engine}.generate: prompt_ids[{i}][{j}] = {tok!r} is not a token id{where}")


def rollout_tensors(
    prompt: torch.Tensor, prompt_mask: torch.Tensor, response: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The tensors every engine returns for left-padded prompts (B, Tp) and right-padded responses (B, Tr): the
    two parts, their masks, the joined ``input_ids`` / ``attention_mask`` (B, Tp + Tr) and ``position_ids`` that
    count real tokens only (0 on padding), so a training forward sees the positions the sampler used."""
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)  # (B, Tp + Tr)
    return {
        "prompt_ids": prompt,
        "prompt_mask": prompt_mask,
        "response_ids": response,
        "response_mask": response_mask,
        "input_ids": torch.cat([prompt, response], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0),
    }


def pad_prompts(tokens: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists left-padded to one width: (prompt (B, Tp) long, prompt_mask (B, Tp) long)."""
    width = max((len(t) for t in tokens), default=0)
    prompt = torch.tensor([[pad_id] * (width - len(t)) + [int(x) for x in t] for t in tokens], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tokens], dtype=torch.long)
    return prompt.reshape(len(tokens), width), mask.reshape(len(tokens), width)


def pad_responses(tokens: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists right-padded to one width: (response (B, Tr) long, response_mask (B, Tr) long)."""
    width = max((len(t) for t in tokens), default=0)
    response = torch.tensor([list(t) + [pad_id] * (width - len(t)) for t in tokens], dtype=torch.long)
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tokens], dtype=torch.long)
    return response.reshape(len(tokens), width), mask.reshape(len(tokens), width)


# ----------------------------------------------------------------------------------------------- decode state
@dataclasses.dataclass
class _Live:
    """Per-row state of the rows still in the running batch (b of them). Tensors share the first dim."""

    rows: torch.Tensor  # (b,) row of the result each live row belongs to
    token: torch.Tensor  # (b,) last sampled token, fed at the next step
    position: torch.Tensor  # (b,) position id of `token`
    running: torch.Tensor  # (b,) bool; False once the row ended (it leaves at the next compaction)
    tokens: torch.Tensor  # (b, max_new) generated ids, pad after the end
    length: torch.Tensor  # (b,) generated tokens, the ending token included
    reason: torch.Tensor  # (b,) finish code, index into FINISH_REASONS
    logprobs: torch.Tensor | None = None  # (b, max_new) sampling log-probs
    seen: torch.Tensor | None = None  # (b, V) bool: tokens in prompt + response (repetition penalty)
    keys: torch.Tensor | None = None  # (b, 2) sampling key of each row's (seed, sample index) stream

    def select(self, keep: torch.Tensor) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, value[keep])


@dataclasses.dataclass
class _Out:
    """Result buffers for all B rows; rows are written when they leave the running batch."""

    tokens: torch.Tensor  # (B, max_new)
    length: torch.Tensor  # (B,)
    reason: torch.Tensor  # (B,)
    logprobs: torch.Tensor | None  # (B, max_new)

    def store(self, live: _Live, which: torch.Tensor) -> None:
        rows = live.rows[which]
        self.tokens[rows] = live.tokens[which]
        self.length[rows] = live.length[which]
        self.reason[rows] = live.reason[which]
        if self.logprobs is not None:
            assert live.logprobs is not None  # both exist when params.logprobs
            self.logprobs[rows] = live.logprobs[which]


class _Runner(Protocol):
    """What the decode loop drives: ``lean.LeanRunner`` (and its CUDA-graph subclass) or :class:`_HFRunner`."""

    prompt_lengths: list[int]  # real tokens per prompt, set by the engine (host copy)

    def prefill(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor: ...

    def repeat(self, n: int) -> None: ...

    def start(self, prompt_mask: torch.Tensor) -> None: ...

    def step(self, token: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor: ...

    def select(self, order: torch.Tensor) -> None: ...


class _HFRunner:
    """The model's own forward with a (preallocated) ``DynamicCache``; the interface of ``lean.LeanRunner``."""

    prompt_lengths: list[int]  # set by the engine; the HF forward does not need it

    def __init__(self, model: Any, width: int, max_new: int, preallocate: bool, logits_to_keep: bool) -> None:
        self.model, self.width, self.max_new, self.logits_to_keep = model, width, max_new, logits_to_keep
        self.cache = (
            preallocated_cache(model.config, width + max_new) if preallocate else DynamicCache(config=model.config)
        )
        self.mask: torch.Tensor | None = None  # (b, Tp + max_new) attention mask: prompt columns then ones

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Model forward with the cache; float32 logits of the last position, (b, V)."""
        extra = {"logits_to_keep": 1} if last_only and self.logits_to_keep else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position,
            past_key_values=self.cache,
            use_cache=True,
            **extra,
        )
        logits: torch.Tensor = out.logits[:, -1].float()
        return logits

    def prefill(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self._forward(prompt, prompt_mask, position, last_only=True)

    def repeat(self, n: int) -> None:
        if n > 1:
            self.cache.batch_repeat_interleave(n)

    def start(self, prompt_mask: torch.Tensor) -> None:
        self.mask = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], self.max_new)], dim=1)

    def step(self, token: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
        assert self.mask is not None  # set by start
        return self._forward(token[:, None], self.mask[:, : self.width + t + 1], position[:, None], last_only=False)

    def select(self, order: torch.Tensor) -> None:
        assert self.mask is not None  # set by start
        self.mask = self.mask[order]
        select_rows(self.cache, order)


# ----------------------------------------------------------------------------------------------- engine
class HFEngine:
    """Built-in rollout engine for a Hugging Face causal LM (see the module docstring).

    model: a ``PreTrainedModel`` with a causal-LM head. tokenizer: optional; needed only for stop strings and
    as the source of the pad/EOS ids. pad_token_id / eos_token_id (an int or a list) override the tokenizer's
    and the model's generation config. compact_every: drop finished rows every this many steps (each check
    is one host sync); None means 1 on CPU and 4 on accelerators, where syncs are dear. fast_path: run
    Llama-family models (llama, mistral, qwen2, qwen3) with the lean forward of ``lean.py`` (bit-identical
    outputs in float32 with sdpa attention, far less Python per step); models it does not cover fall back
    to the model's own forward by themselves, and ``fast_path=False`` forces that fallback. After each
    ``generate``, ``last_path`` is
    ``"lean"`` or ``"hf"`` and ``fallback_reason`` says why the lean forward was not used (None if it was).
    preallocate (HF forward only): use :func:`~alignflow.rollout.kv_cache.preallocated_cache` (in-place KV
    writes) instead of a plain ``DynamicCache`` (which copies the whole cache at every step); same outputs.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        pad_token_id: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        compact_every: int | None = None,
        preallocate: bool = True,
        fast_path: bool = True,
    ) -> None:
        self.model = model
        self.preallocate = preallocate
        self.fast_path = fast_path
        self.last_path: str | None = None
        self.fallback_reason: str | None = None
        self.graph_reason: str | None = None  # why the lean decode step is not CUDA-graphed (None if it is)
        self._prompt_lengths: list[int] = []
        self.tokenizer = tokenizer
        gen_cfg = getattr(model, "generation_config", None)
        eos = eos_token_id
        for source in (tokenizer, gen_cfg, model.config):
            if eos is None and source is not None:
                eos = getattr(source, "eos_token_id", None)
        if eos is None:
            raise ValueError("HFEngine: no EOS id found; pass eos_token_id=... (or a tokenizer that has one)")
        self.eos_ids = [int(e) for e in ([eos] if isinstance(eos, int) else eos)]
        pad = pad_token_id
        for source in (tokenizer, gen_cfg):
            if pad is None and source is not None:
                pad = getattr(source, "pad_token_id", None)
        self.pad_id = int(self.eos_ids[0] if pad is None else pad)
        if compact_every is not None and compact_every < 1:
            raise ValueError(f"HFEngine: compact_every must be >= 1, got {compact_every}")
        self.compact_every = compact_every
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def device(self) -> torch.device:
        device: torch.device = next(self.model.parameters()).device
        return device

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Batch:
        """Sample ``params.n`` responses per prompt. Rows i*n .. i*n+n-1 belong to prompt i.

        Returns a Batch with tensors (masks are int64 0/1):
          prompt_ids (B, Tp) left-padded with the pad id; prompt_mask (B, Tp);
          response_ids (B, Tr) right-padded with the pad id; response_mask (B, Tr), 1 on generated tokens
          including the EOS / stop token that ended the row; input_ids = cat(prompt, response) (B, Tp+Tr);
          attention_mask = cat(prompt_mask, response_mask); position_ids (B, Tp+Tr), the ones used while
          generating (cumsum(attention_mask) - 1, 0 on padding) for a training forward that must match;
          sampling_logprobs (B, Tr) when params.logprobs: log_softmax(logits / T) at the chosen token
          (T = 1 for greedy; no repetition penalty or top-k/p truncation), 0 on padding;
        and meta: prompt_index (int per row), finish_reason ("eos" | "stop" | "length").

        With ``params.seeds`` (one per prompt) row i*n + j depends only on prompt i, ``seeds[i]``, j and the model:
        the same whatever other prompts share the call, their order, or how the prompts are split into calls.
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"HFEngine.generate: params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("HFEngine.generate: stop_strings need a tokenizer; build HFEngine(model, tokenizer)")
        prompt, prompt_mask = self._left_pad(prompt_ids)  # (P, Tp)
        self._prompt_lengths = [len(row) for row in prompt_ids]
        params.check_seeds(len(prompt_ids), "HFEngine.generate")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                out = self._run(prompt, prompt_mask, params)
        finally:
            self.model.train(was_training)
        # Built outside inference mode: the trainer's forward/backward may save these tensors for autograd.
        prompt = prompt.repeat_interleave(params.n, dim=0)  # (B, Tp)
        prompt_mask = prompt_mask.repeat_interleave(params.n, dim=0)
        return self._assemble(prompt, prompt_mask, out, params)

    # ------------------------------------------------------------------------------------------- pieces
    def _left_pad(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the prompts and left-pad them: (P, Tp) ids and mask on the model's device."""
        validate_prompt_ids(prompt_ids, "HFEngine", self.vocab_size)
        ids, mask = pad_prompts(prompt_ids, self.pad_id)
        return ids.to(self.device), mask.to(self.device)

    def _runner(self, width: int, max_new: int) -> _Runner:
        """The lean runner when the model is supported (and fast_path is on), else the HF-forward runner."""
        reason = unsupported_reason(self.model, width + max_new) if self.fast_path else "fast_path=False"
        self.fallback_reason = reason
        self.last_path = "hf" if reason else "lean"
        if reason is None:
            self.graph_reason = graphs_supported(self.model)
            runner_cls = LeanRunner if self.graph_reason else GraphedLeanRunner
            self.last_path = "lean" if self.graph_reason else "lean+graphs"
            return runner_cls(self.model, width, max_new)
        return _HFRunner(self.model, width, max_new, self.preallocate, self._logits_to_keep)

    def _run(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams) -> _Out:
        """Prefill the distinct prompts once, repeat their cache rows for n samples, then decode."""
        device, n, max_new = prompt.device, params.n, params.max_new_tokens
        rows, width = prompt.shape[0] * n, prompt.shape[1]
        runner = self._runner(width, max_new)
        runner.prompt_lengths = self._prompt_lengths  # host copy: no device sync for the prefill's lengths
        position = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)  # (P, Tp)
        logits = runner.prefill(prompt, prompt_mask, position)  # (P, V)
        runner.repeat(n)  # rows i*n .. i*n+n-1 share prompt i's cache rows: one prefill per distinct prompt
        if n > 1:
            logits = logits.repeat_interleave(n, dim=0)  # (B, V)
        prompt, prompt_mask = prompt.repeat_interleave(n, dim=0), prompt_mask.repeat_interleave(n, dim=0)
        runner.start(prompt_mask)
        live = _Live(
            rows=torch.arange(rows, device=device),
            token=torch.full((rows,), self.pad_id, device=device),
            position=prompt_mask.sum(-1),
            running=torch.ones(rows, dtype=torch.bool, device=device),
            tokens=torch.full((rows, max_new), self.pad_id, device=device),
            length=torch.full((rows,), max_new, device=device),
            reason=torch.zeros(rows, dtype=torch.long, device=device),
            logprobs=torch.zeros(rows, max_new, device=device) if params.logprobs else None,
            seen=(presence_mask(prompt, prompt_mask, logits.shape[-1]) if params.repetition_penalty != 1.0 else None),
            # Row i*n + j samples from the stream (seeds[i], j); the key travels with the row through compaction.
            keys=sample_keys(params.seeds, n, device) if params.seeds is not None and not params.greedy else None,
        )
        out = _Out(
            tokens=live.tokens.clone(),
            length=live.length.clone(),
            reason=live.reason.clone(),
            logprobs=None if live.logprobs is None else live.logprobs.clone(),
        )
        self._decode(live, out, runner, logits, params)
        return out

    def _decode(self, live: _Live, out: _Out, runner: _Runner, logits: torch.Tensor, params: SamplingParams) -> None:
        """The decode loop: sample, record, end rows, drop ended rows, feed the sampled tokens."""
        device, max_new = logits.device, params.max_new_tokens
        generator = None
        if params.seeds is None:  # one generator for the whole batch (with `seeds`, live.keys key the noise)
            generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            generator.manual_seed(seed)
        stop_ids = torch.tensor(sorted(set(self.eos_ids) | set(params.stop_token_ids)), device=device)
        eos_ids = torch.tensor(self.eos_ids, device=device)
        every = self.compact_every or (1 if device.type == "cpu" else 4)
        for t in range(max_new):
            token = sample_tokens(logits, params, generator, live.seen, keys=live.keys, step=t)  # (b,)
            token = live.token = torch.where(live.running, token, self.pad_id)
            live.tokens[:, t] = token
            if live.logprobs is not None:
                live.logprobs[:, t] = chosen_logprobs(logits, token, params.temperature)
            ended = live.running & torch.isin(token, stop_ids)  # (b,)
            code = torch.where(torch.isin(token, eos_ids), 1, 2) if params.stop_token_ids else 1
            live.reason = torch.where(ended, code, live.reason)
            if params.stop_strings:
                by_string = live.running & ~ended & self._stop_string_hits(live, t, params.stop_strings)
                live.reason = torch.where(by_string, 2, live.reason)
                ended = ended | by_string
            live.length.masked_fill_(ended, t + 1)
            live.running &= ~ended
            if live.seen is not None:
                live.seen.scatter_(1, token[:, None], True)
            if t + 1 == max_new:
                break
            if (t + 1) % every == 0 and not bool(live.running.all()):
                if not self._compact(live, out, runner):
                    return
            logits = runner.step(live.token, live.position, t)
            live.position += 1
        out.store(live, torch.arange(live.rows.shape[0], device=device))

    def _compact(self, live: _Live, out: _Out, runner: _Runner) -> bool:
        """Store ended rows and keep only running ones (state and cache). False when none is left.

        The kept rows' new order fills each ended row's slot inside the kept prefix with a running row from
        beyond it, so the preallocated cache moves only those rows (see ``kv_cache.select_rows``).
        """
        running = live.running
        keep = running.nonzero().squeeze(1)  # (b',) ascending
        out.store(live, (~running).nonzero().squeeze(1))
        kept = keep.shape[0]
        if kept == 0:
            return False
        order = torch.arange(kept, device=keep.device)  # (b',) new row j <- old row order[j]
        order[(~running[:kept]).nonzero().squeeze(1)] = keep[keep >= kept]
        live.select(order)
        runner.select(order)
        return True

    def _stop_string_hits(self, live: _Live, t: int, stop_strings: list[str]) -> torch.Tensor:
        """(b,) bool: rows whose recent response text contains a stop string.

        Decodes only the last ``max(len(s)) + 4`` tokens of each running row: a stop string completed by the
        newest token lies in that window (each token adds at least one character; +4 covers tokens that
        decode to nothing on their own, e.g. partial UTF-8 bytes). Strings that completed earlier were found
        at their own step.
        """
        window = max(len(s) for s in stop_strings) + 4
        recent = live.tokens[:, max(0, t + 1 - window) : t + 1].tolist()
        running = live.running.tolist()
        idx = [i for i, r in enumerate(running) if r]
        texts = self.tokenizer.batch_decode([recent[i] for i in idx], skip_special_tokens=False)
        hits = [False] * len(running)
        for i, text in zip(idx, texts, strict=False):
            hits[i] = any(s in text for s in stop_strings)
        return torch.tensor(hits, dtype=torch.bool, device=live.running.device)

    def _assemble(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, out: _Out, params: SamplingParams) -> Batch:
        """The result Batch (see :meth:`generate`)."""
        width = int(out.length.max())
        response = out.tokens[:, :width].clone()  # (B, Tr)
        steps = torch.arange(width, device=response.device)
        response_mask = (steps[None, :] < out.length[:, None]).long()  # (B, Tr)
        tensors = rollout_tensors(prompt, prompt_mask, response, response_mask)
        if out.logprobs is not None:
            tensors["sampling_logprobs"] = out.logprobs[:, :width].clone() * response_mask
        meta: dict[str, list[Any]] = {
            "prompt_index": [i // params.n for i in range(prompt.shape[0])],
            "finish_reason": [FINISH_REASONS[c] for c in out.reason.tolist()],
        }
        return Batch(tensors, meta)
