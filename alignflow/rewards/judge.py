"""LLM judges as rewards: a causal LM reads the prompt and the response and writes a verdict (``docs/judges.md``).

Three templates, each a question whose answer ends with a fixed verdict line; the judge may reason first:

* ``pointwise`` -- "rate the response 1..10", verdict ``Score: N``; reward ``(N - lo) / (hi - lo)`` in [0, 1];
* ``pairwise`` -- "which of A and B is better", verdict ``Verdict: A`` or ``Verdict: B``; the response is
  compared with the row's anchor (meta ``anchor_field``, e.g. a reference answer), in both orders when
  ``both_orders`` (position bias cancels); reward = the fraction of comparisons it wins;
* ``principle`` (binary, principle-conditioned feedback as in RLBFF) -- "does the response satisfy principle
  P", verdict ``Answer: Yes`` / ``Answer: No``; reward = the fraction of the principles satisfied (the row's
  ``principles`` / ``principle`` field when present, else the configured list).

**Parsing.** The LAST verdict line in the output counts (reasoning before it may mention the format); markers
are case-insensitive and tolerate spaces (``score : 7``, ``**Verdict:** B``). A pointwise score outside
``[lo, hi]`` is a parse failure.

**Parse failures.** An unparsed query is asked again ``parse_retries`` times with sampling
(``retry_temperature``); what still fails is handled by ``on_parse_failure``: ``error`` (default) raises
:class:`~alignflow.rewards.rules.RewardError` naming the row, the template and the end of the judge's output;
``fallback`` gives that verdict the value ``fallback`` and flags the row, which the RL metrics count under
``reward/errors`` (the failure flags of :mod:`alignflow.rewards.base`: ``with_failures``). Every call also
reports ``rollout/<name>_parse_failures`` in ``last_metrics``. Failures are never cached.

**Batching and caching.** Every query of a batch (rows x comparisons x principles) whose key is not cached
goes to the backend in chunks of ``batch_size``; verdicts are cached per (template, prompt, response, anchor or
principle, order), so a response judged again (a repeated sample, the greedy evaluation) costs nothing.

**Verdict from probabilities** (``verdict="logprob"``, local judge): instead of sampling an answer, the judge
scores each verdict continuation of ``verdict_words`` after the question, ``l_k`` the summed log-probability of
continuation k's tokens, and renormalises over them: ``p_k = exp(l_k) / sum_j exp(l_j)``. The value is

* pairwise -- ``p_1``, the judge's probability that the first response is the better one (words: first wins,
  second wins; e.g. ``" overall this"`` / ``" overall that"``);
* principle -- ``p_1``, its probability of yes (words: yes, no);
* pointwise -- the expected score ``sum_k p_k * k / (K - 1)`` in [0, 1], the K words listed from the lowest score to
  the highest (default ``Score: lo`` .. ``Score: hi``, so the value is E[N - lo] / (hi - lo), the text verdict's
  scale; two words ``bad`` / ``good`` give p(good)).

One forward pass per continuation, no parse failures by construction.

Backends: :class:`LocalJudge` (a Hugging Face causal LM through :class:`alignflow.rollout.HFEngine`, greedy by
default, or loaded into its own :class:`~alignflow.rollout.vllm_engine.VLLMEngine` with ``backend="vllm"``) and
:class:`EndpointJudge` (an OpenAI-compatible ``/v1/chat/completions`` server, e.g. vLLM's).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from alignflow.batch import Batch
from alignflow.config import ConfigError, ModelConfig
from alignflow.data.render import chat_ids
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.rewards.base import output_device
from alignflow.rewards.remote import _Fatal, post_with_retries
from alignflow.rewards.rules import RewardError
from alignflow.rewards.verdict import FIRST, parse_position
from alignflow.rollout import HFEngine, SamplingParams

TEMPLATES = {
    "pointwise": (
        "Read the prompt and the response, and judge how helpful, correct and well written the response is.\n\n"
        "Prompt:\n{prompt}\n\nResponse:\n{response}\n\n"
        "Explain your judgement briefly, then end with one line 'Score: N', N a whole number from {lo} to {hi}."
    ),
    "pairwise": (
        "Read the prompt and two responses, and decide which one answers it better.\n\n"
        "Prompt:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
        "Compare them briefly, then end with one line 'Verdict: A' or 'Verdict: B'."
    ),
    "principle": (
        "Read the prompt and the response, and check one principle.\n\n"
        "Prompt:\n{prompt}\n\nResponse:\n{response}\n\nPrinciple: {principle}\n\n"
        "Does the response satisfy the principle? Reason briefly, then end with one line 'Answer: Yes' or "
        "'Answer: No'."
    ),
}
_MARK = r"[\*_\s]*"  # markdown emphasis and spaces around a marker
PATTERNS = {
    "pointwise": re.compile(rf"score{_MARK}[:=]{_MARK}(-?\d+(?:\s*\.\s*\d+)?)", re.IGNORECASE),
    "pairwise": re.compile(rf"verdict{_MARK}[:=]{_MARK}\[?\s*(A|B)\b", re.IGNORECASE),
    "principle": re.compile(rf"answer{_MARK}[:=]{_MARK}(yes|no)\b", re.IGNORECASE),
}
FAILURE_POLICIES = ("error", "fallback")
VERDICT_MODES = ("text", "logprob")


def default_verdict_words(template: str, lo: float = 1, hi: float = 10) -> tuple:
    """The continuations ``verdict="logprob"`` scores when none are given: the template's own verdict lines
    (pairwise: first, second; principle: yes, no; pointwise: ``Score: lo`` .. ``Score: hi``, whole numbers)."""
    if template == "pairwise":
        return ("Verdict: A", "Verdict: B")
    if template == "principle":
        return ("Answer: Yes", "Answer: No")
    if lo != int(lo) or hi != int(hi):
        raise ValueError(f"judge verdict=logprob: score_range {lo}..{hi} is not whole numbers; give verdict_words")
    return tuple(f"Score: {n}" for n in range(int(lo), int(hi) + 1))


def verdict_value(template: str, dist: Sequence[float]) -> float:
    """The reward of one verdict distribution over ``verdict_words`` (module docstring): the first word's
    probability (pairwise, principle), or the expected score sum_k p_k k / (K - 1) (pointwise)."""
    if template == "pointwise":
        return sum(p * k for k, p in enumerate(dist)) / (len(dist) - 1)
    return float(dist[0])


def parse_verdict(template: str, text: str, lo: float = 1, hi: float = 10) -> float | None:
    """The value of the LAST verdict in ``text``: pointwise (N - lo)/(hi - lo); pairwise 1.0 for A, 0.0 for B;
    principle 1.0 for yes, 0.0 for no. None when there is no verdict (or a score outside [lo, hi]). A pairwise
    verdict may also be the built-in reviews judge's ``overall this`` / ``overall that`` (first / second;
    :func:`alignflow.rewards.verdict.parse_position`, the last verdict of either form counts)."""
    if template == "pairwise":
        pos = parse_position(text)
        return None if pos is None else float(pos == FIRST)
    found = PATTERNS[template].findall(text)
    if not found:
        return None
    v = found[-1]
    if template == "pointwise":
        n = float(re.sub(r"\s", "", v))
        return (n - lo) / (hi - lo) if lo <= n <= hi else None
    return 1.0 if v.lower() == "yes" else 0.0


def prompt_text(prompt: Any) -> str:
    """A prompt as plain text: a string as it is, a message list as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt)


# ----------------------------------------------------------------------------------------------- backends
class LocalJudge:
    """A local causal LM as the judge, generating through :class:`alignflow.rollout.HFEngine`.

    The question is one user message, rendered with the tokenizer's chat template (plain text when it has
    none); prompts longer than the model's positions minus ``max_new_tokens`` keep their last tokens.
    """

    def __init__(
        self, model, tokenizer, max_new_tokens: int = 256, seed: int = 0, chat: bool = True, engine=None, positions=0
    ):
        self.model, self.tokenizer, self.max_new_tokens, self.seed = model, tokenizer, int(max_new_tokens), seed
        self.chat = chat  # False: the question as plain text even when the tokenizer has a chat template
        # engine: the generator of answers (default: HFEngine over ``model``; a VLLMEngine for backend=vllm, which
        # holds its own copy of the weights, and then ``model`` is None and ``positions`` the model's length)
        self.engine = engine if engine is not None else HFEngine(model, tokenizer)
        positions = positions or int(getattr(model.config, "max_position_embeddings", 4096))
        self.limit = positions - self.max_new_tokens
        if self.limit < 1:
            raise ValueError(
                f"judge max_new_tokens={max_new_tokens} leaves no room for the question in the model's "
                f"{self.limit + self.max_new_tokens} positions"
            )

    @classmethod
    def from_path(
        cls, path: str, device="cpu", max_new_tokens: int = 256, seed: int = 0, chat: bool = True, vllm=None
    ) -> LocalJudge:
        """The judge at ``path`` generating with alignflow's engine, or with vLLM when ``vllm`` is a dict of
        :class:`~alignflow.rollout.vllm_engine.VLLMEngine` options (the weights loaded by vLLM from ``path``;
        ``verdict=logprob`` then unavailable: it reads the HF model's probabilities)."""
        tok = load_tokenizer(path)
        if vllm is not None:
            from transformers import AutoConfig

            from alignflow.rollout.vllm_engine import VLLMEngine

            positions = int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 4096))
            engine = VLLMEngine(path, tok, seed=seed, device=device, **vllm)
            return cls(None, tok, max_new_tokens, seed, chat, engine=engine, positions=positions)
        model = load_causal_lm(ModelConfig(name_or_path=path), device)
        model.requires_grad_(False)
        return cls(model.eval(), tok, max_new_tokens, seed, chat)

    def _ids(self, question: str) -> list[int]:
        tok = self.tokenizer
        if self.chat and getattr(tok, "chat_template", None):
            ids = chat_ids(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
        else:
            ids = tok(question).input_ids
        return ids[-self.limit :]

    def verdict_tokens(self, continuations: Sequence[str]) -> list[list[int]]:
        """The token ids of each verdict continuation; ValueError unless there are at least two, no two with the
        same tokens, each at most ``max_new_tokens`` tokens (checked when a judge reward is built)."""
        conts = [list(self.tokenizer(c, add_special_tokens=False).input_ids) for c in continuations]
        distinct = len({tuple(c) for c in conts}) == len(conts)
        if len(conts) < 2 or not all(conts) or not distinct or max(map(len, conts)) > self.max_new_tokens:
            raise ValueError(
                f"verdict_words must be at least two continuations with different tokens, each at most "
                f"max_new_tokens={self.max_new_tokens} tokens long; got {list(continuations)!r}"
            )
        return conts

    @torch.no_grad()
    def verdict_dist(self, questions: list[str], continuations: Sequence[str]) -> list[list[float]]:
        """Per question, the softmax over the continuations' summed log-probabilities ``l_k`` after the question
        (as :meth:`complete` would see it). ValueError unless there are at least two continuations, no two with
        the same tokens, each at most ``max_new_tokens`` tokens."""
        if self.model is None:
            raise ValueError("verdict=logprob reads the judge model's probabilities: not with backend=vllm")
        conts = self.verdict_tokens(continuations)
        seqs, starts = [], []
        for q in questions:
            ids = self._ids(q)  # cut to the model's positions less max_new_tokens
            for c in conts:
                seqs.append(ids + c)
                starts.append(len(ids))
        lp = continuation_logprobs(self.model, seqs, starts, self.tokenizer.pad_token_id or 0)
        return lp.view(len(questions), len(conts)).softmax(-1).tolist()

    def complete(self, questions: list[str], temperature: float = 0.0, attempt: int = 0) -> list[str]:
        params = SamplingParams(
            temperature=temperature, max_new_tokens=self.max_new_tokens, seed=self.seed * 1_000_003 + attempt
        )
        out = self.engine.generate([self._ids(q) for q in questions], params)
        ids, mask = out["response_ids"], out["response_mask"]
        return self.tokenizer.batch_decode(
            [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)], skip_special_tokens=True
        )


def continuation_logprobs(model, seqs: list[list[int]], starts: list[int], pad_id: int = 0) -> torch.Tensor:
    """(N,) float64: for each token sequence, the summed log-probability of its tokens from ``starts[i]`` on,
    each given the tokens before it (one right-padded forward pass). A start of 0 leaves the first token out:
    nothing predicts it."""
    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.double().cpu()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    pos = torch.arange(1, width).unsqueeze(0)  # the position of each predicted token
    keep = (pos >= torch.tensor(starts).clamp(min=1).unsqueeze(1)) & mask[:, 1:].bool()
    return (logp * keep).sum(-1)


class EndpointJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint (vLLM, TGI, llama.cpp server, a hosted API).

    url: the base (``http://host:8000/v1``) or the full ``.../chat/completions`` URL; model: the served model's
    name; the API key, when needed, is read from the environment variable ``api_key_env`` (never from a
    config file). One request per question, ``concurrency`` at a time; timeouts, retries and malformed replies
    follow the remote-reward policy (:mod:`alignflow.rewards.remote`).
    """

    def __init__(
        self,
        url: str,
        model: str,
        max_tokens: int = 512,
        timeout_s: float = 60.0,
        retries: int = 2,
        concurrency: int = 8,
        api_key_env: str = "OPENAI_API_KEY",
        backoff_s: float = 0.5,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must start with http:// or https://, got {url!r}")
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model, self.max_tokens, self.timeout_s, self.retries = model, int(max_tokens), timeout_s, int(retries)
        self.concurrency, self.backoff_s, self.api_key_env = max(1, int(concurrency)), backoff_s, api_key_env

    @staticmethod
    def _content(reply: Any) -> str:
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _Fatal(f"malformed reply: no choices[0].message.content in {str(reply)[:200]}") from None
        if not isinstance(content, str):
            raise _Fatal(f"malformed reply: message content is {type(content).__name__}, not a string")
        return content

    def complete(self, questions: list[str], temperature: float = 0.0, attempt: int = 0) -> list[str]:
        key = os.environ.get(self.api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else None

        def one(i: int) -> str:
            payload = {
                "model": self.model,
                "messages": [{"role": "user", "content": questions[i]}],
                "max_tokens": self.max_tokens,
                "temperature": temperature,
            }
            return post_with_retries(
                self.url,
                payload,
                self.timeout_s,
                self.retries,
                self.backoff_s,
                self._content,
                f"judge endpoint {self.url}: question {i}",
                "judge",
                i,
                headers,
            )[0]

        with ThreadPoolExecutor(min(self.concurrency, max(1, len(questions)))) as pool:
            return list(pool.map(one, range(len(questions))))


# ----------------------------------------------------------------------------------------------- the reward
class _Query:
    __slots__ = ("row", "key", "question", "flip")

    def __init__(self, row: int, key: tuple, question: str, flip: bool):
        self.row, self.key, self.question, self.flip = row, key, question, flip


class JudgeReward:
    """``reward(batch) -> (B,)`` from an LLM judge's verdicts (see the module docstring for the templates, the
    parse-failure policy and the cache).

    backend: a :class:`LocalJudge` or :class:`EndpointJudge` (anything with ``complete(questions, temperature,
    attempt) -> list[str]``). ``last_metrics`` holds the last call's ``rollout/<name>_queries``, ``_cache_hits``,
    ``_parse_failures`` and ``_retries``; ``totals`` the counts since creation. :meth:`with_failures` also
    returns the rows scored with the fallback (``{"errors": (B,) 0/1}``), which the RL metrics count.
    """

    name = "judge"

    def __init__(
        self,
        backend,
        template: str = "pointwise",
        *,
        principles: Sequence[str] = (),
        anchor_field: str = "reference",
        both_orders: bool = True,
        score_range: tuple = (1, 10),
        on_parse_failure: str = "error",
        fallback: float = 0.0,
        parse_retries: int = 0,
        retry_temperature: float = 0.7,
        batch_size: int = 32,
        name: str = "judge",
        question: str = "",
        verdict: str = "text",
        verdict_words: Sequence[str] = (),
    ):
        if template not in TEMPLATES:
            raise ValueError(f"judge template {template!r} is not one of {', '.join(TEMPLATES)}")
        if on_parse_failure not in FAILURE_POLICIES:
            raise ValueError(f"judge on_parse_failure {on_parse_failure!r} is not one of {', '.join(FAILURE_POLICIES)}")
        lo, hi = score_range
        if not lo < hi:
            raise ValueError(f"judge score_range must be (lo, hi) with lo < hi, got {score_range}")
        if batch_size < 1 or parse_retries < 0:
            raise ValueError(f"judge batch_size must be >= 1 and parse_retries >= 0, got {batch_size}, {parse_retries}")
        self.backend, self.template, self.principles = backend, template, [str(p) for p in principles]
        self.anchor_field, self.both_orders, self.lo, self.hi = anchor_field, both_orders, lo, hi
        self.on_parse_failure, self.fallback, self.parse_retries = on_parse_failure, float(fallback), parse_retries
        self.retry_temperature, self.batch_size, self.name = retry_temperature, int(batch_size), name
        self.question = question or TEMPLATES[template]
        if verdict not in VERDICT_MODES:
            raise ValueError(f"judge verdict {verdict!r} is not one of {', '.join(VERDICT_MODES)}")
        if verdict == "logprob" and not hasattr(backend, "verdict_dist"):
            raise ValueError(
                "judge verdict=logprob reads the verdict words' probabilities: it needs a local judge (model, not url)"
            )
        words = tuple(str(w) for w in verdict_words) or default_verdict_words(template, lo, hi)
        need = "at least two" if template == "pointwise" else "exactly two"
        if verdict == "logprob" and (len(words) < 2 or (template != "pointwise" and len(words) != 2)):
            raise ValueError(f"judge verdict_words: template {template} reads {need} continuations, got {list(words)}")
        if verdict == "logprob" and getattr(backend, "model", True) is None:
            raise ValueError("judge verdict=logprob reads the judge model's probabilities: use backend=hf, not vllm")
        if verdict == "logprob" and hasattr(backend, "verdict_tokens"):
            backend.verdict_tokens(words)  # words the judge's tokenizer cannot tell apart stop here, not mid-run
        self.verdict, self.verdict_words = verdict, list(words)
        try:  # the fields the template's question may use; an unknown one is a config error, not a crash later
            self.question.format(prompt="", response="", a="", b="", principle="", lo=lo, hi=hi)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"judge question template {self.question[:60]!r}: {e!r} is not a field") from None
        self.cache: dict = {}
        self.totals = {"queries": 0, "cache_hits": 0, "parse_failures": 0, "retries": 0}
        self.last_metrics: dict = {}
        self.last_failed: torch.Tensor = torch.zeros(0)

    def _row_principles(self, batch: Batch, i: int) -> list[str]:
        for field in ("principles", "principle"):
            value = batch.meta.get(field, [None] * len(batch))[i] if field in batch.meta else None
            if value:
                return [value] if isinstance(value, str) else [str(v) for v in value]
        if not self.principles:
            raise RewardError(
                f"judge {self.name!r}: row {i} has no 'principles' field and no principles are "
                "configured (judge.principles)",
                self.name,
                i,
            )
        return self.principles

    def _queries(self, batch: Batch) -> list[_Query]:
        prompts, responses = batch.meta["prompt"], batch.meta["response"]
        out, t = [], self.template
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            ptext, pkey = prompt_text(p), json.dumps(p, sort_keys=True)
            if t == "pointwise":
                q = self.question.format(prompt=ptext, response=r, lo=self.lo, hi=self.hi)
                out.append(_Query(i, (t, pkey, r, self.lo, self.hi), q, False))
            elif t == "pairwise":
                anchors = batch.meta.get(self.anchor_field) if self.anchor_field in batch.meta else None
                anchor = anchors[i] if anchors is not None else None
                if not isinstance(anchor, str):
                    raise RewardError(
                        f"judge {self.name!r}: row {i} has no {self.anchor_field!r} response to compare "
                        f"with (judge.anchor_field; got {anchor!r:.60})",
                        self.name,
                        i,
                    )
                out.append(
                    _Query(i, (t, pkey, r, anchor, "A"), self.question.format(prompt=ptext, a=r, b=anchor), False)
                )
                if self.both_orders:
                    q = self.question.format(prompt=ptext, a=anchor, b=r)
                    out.append(_Query(i, (t, pkey, r, anchor, "B"), q, True))
            else:
                for pr in self._row_principles(batch, i):
                    q = self.question.format(prompt=ptext, response=r, principle=pr)
                    out.append(_Query(i, (t, pkey, r, pr), q, False))
        return out

    def _ask(self, questions: list[str], temperature: float, attempt: int) -> list[str]:
        outs: list[str] = []
        for lo in range(0, len(questions), self.batch_size):
            outs += self.backend.complete(questions[lo : lo + self.batch_size], temperature, attempt)
        if len(outs) != len(questions):
            raise RewardError(
                f"judge {self.name!r}: the backend returned {len(outs)} outputs for {len(questions)} questions",
                self.name,
            )
        return outs

    def _judge(self, todo: list[_Query]) -> dict:
        """Ask every query in ``todo`` (retrying unparsed ones); returns {key: value or None}, fills the cache."""
        if self.verdict == "logprob":  # a probability per question: nothing to parse, nothing to retry
            qs = [q.question for q in todo]
            dists = [
                d
                for lo in range(0, len(qs), self.batch_size)
                for d in self.backend.verdict_dist(qs[lo : lo + self.batch_size], self.verdict_words)
            ]
            got = {q.key: verdict_value(self.template, d) for q, d in zip(todo, dists, strict=True)}
            self.cache.update(got)
            return got
        got, pending, outputs = {}, list(todo), {}
        for attempt in range(self.parse_retries + 1):
            if not pending:
                break
            temp = 0.0 if attempt == 0 else self.retry_temperature
            self.last_metrics[f"rollout/{self.name}_retries"] += len(pending) if attempt else 0
            for q, text in zip(pending, self._ask([q.question for q in pending], temp, attempt), strict=True):
                outputs[q.key] = text
                got[q.key] = parse_verdict(self.template, text, self.lo, self.hi)
            pending = [q for q in pending if got[q.key] is None]
        for q in todo:
            if got[q.key] is not None:
                self.cache[q.key] = got[q.key]
        for q in pending:
            if self.on_parse_failure == "error":
                raise RewardError(
                    f"judge {self.name!r}: row {q.row}: no {self.template} verdict in the judge's "
                    f"output (after {self.parse_retries + 1} attempts; judge.on_parse_failure=fallback "
                    f"scores it judge.fallback instead): ...{outputs[q.key][-200:]!r}",
                    self.name,
                    q.row,
                )
        return got

    def score(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """(rewards (B,), metrics)."""
        missing = [k for k in ("prompt", "response") if k not in batch.meta]
        if missing:
            raise KeyError(f"judge {self.name!r}: the batch has no meta {', '.join(missing)}")
        queries = self._queries(batch)
        n = self.name
        self.last_metrics = {f"rollout/{n}_queries": float(len(queries)), f"rollout/{n}_retries": 0.0}
        todo = list({q.key: q for q in queries if q.key not in self.cache}.values())
        got = self._judge(todo) if todo else {}
        sums, counts, failed = [0.0] * len(batch), [0] * len(batch), [0.0] * len(batch)
        for q in queries:
            v = self.cache.get(q.key, got.get(q.key))
            if v is None:
                v, failed[q.row] = self.fallback, 1.0
            elif q.flip:
                v = 1.0 - v
            sums[q.row] += v
            counts[q.row] += 1
        fails = sum(1 for q in todo if got.get(q.key) is None)
        self.last_metrics.update(
            {f"rollout/{n}_cache_hits": float(len(queries) - len(todo)), f"rollout/{n}_parse_failures": float(fails)}
        )
        for k in self.totals:
            self.totals[k] += int(self.last_metrics[f"rollout/{n}_{k}"])
        device = output_device(batch)
        self.last_failed = torch.tensor(failed, device=device)  # (B,) 1 where a verdict fell back
        out = torch.tensor([s / c for s, c in zip(sums, counts, strict=True)], dtype=torch.float32, device=device)
        return out, dict(self.last_metrics)

    def with_failures(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """(rewards (B,), {"errors": (B,) 1 on rows with a verdict that fell back to ``fallback``})."""
        out = self.score(batch)[0]
        return out, {"errors": self.last_failed}

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.score(batch)[0]


def build_judge(cfg, device="cpu", seed: int = 0, key: str = "reward.judge") -> JudgeReward:
    """A :class:`JudgeReward` from a :class:`~alignflow.config.JudgeConfig`; ConfigError naming ``key``."""

    if bool(cfg.model) == bool(cfg.url):
        raise ConfigError(
            f"{key}: set exactly one of model (a local causal LM) and url (an OpenAI-compatible "
            f"endpoint); got model={cfg.model!r}, url={cfg.url!r}"
        )
    if cfg.url and cfg.backend == "vllm":
        raise ConfigError(f"{key}.backend=vllm runs a local judge (model), not url: an endpoint serves its own model")
    if cfg.url and not cfg.endpoint_model:
        raise ConfigError(f"{key}.endpoint_model: name the model the endpoint serves")
    try:
        if cfg.url:
            backend = EndpointJudge(cfg.url, cfg.endpoint_model, cfg.max_new_tokens, cfg.timeout_s, cfg.retries)
        else:
            vllm = None
            if cfg.backend == "vllm":
                vllm = {"gpu_memory_utilization": cfg.gpu_memory_utilization, "dtype": cfg.dtype}
            backend = LocalJudge.from_path(cfg.model, device, cfg.max_new_tokens, seed, cfg.chat_template, vllm)
        return JudgeReward(
            backend,
            cfg.template,
            principles=cfg.principles,
            anchor_field=cfg.anchor_field,
            both_orders=cfg.both_orders,
            on_parse_failure=cfg.on_parse_failure,
            fallback=cfg.fallback,
            parse_retries=cfg.parse_retries,
            retry_temperature=cfg.retry_temperature,
            batch_size=cfg.batch_size,
            question=cfg.question,
            verdict=cfg.verdict,
            verdict_words=cfg.verdict_words,
        )
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
