"""Token-level rewards from a rewrite (seq2seq reward model; ``docs/seq2seq_rm.md``).

A seq2seq reward model reads a response and writes a better version of it. How much of the response survives
the rewrite is the reward, token by token: the response and its rewrite are aligned with a longest-matching-
blocks edit alignment (``difflib.SequenceMatcher``, no junk heuristic), and each response token gets

    keep     (default  0.0)   the token is kept in the rewrite
    delete   (default -1.0)   the rewrite drops it
    replace  (default -1.0)   the rewrite puts other tokens in its place
    insert   (default -0.5)   added to the token just before a place where the rewrite inserts tokens the
                              response lacks (to the first token when the insertion is at the start)

An insertion after a token adds to whatever that token already got. The sequence reward is the sum.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch

from alignflow.config import ConfigError, ModelConfig
from alignflow.data.render import encode_prompt
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.rewards.base import output_device
from alignflow.rewards.judge import prompt_text
from alignflow.rollout import HFEngine, SamplingParams


def edit_token_rewards(
    response: Sequence[str],
    rewrite: Sequence[str],
    keep: float = 0.0,
    delete: float = -1.0,
    replace: float = -1.0,
    insert: float = -0.5,
) -> list[float]:
    """One reward per token of ``response`` from its alignment with ``rewrite`` (module docstring)."""
    out = [0.0] * len(response)
    if not response:
        return out
    matcher = difflib.SequenceMatcher(a=list(response), b=list(rewrite), autojunk=False)
    for op, i1, i2, _j1, _j2 in matcher.get_opcodes():
        if op == "insert":
            out[max(i1 - 1, 0)] += insert
            continue
        value = {"equal": keep, "delete": delete, "replace": replace}[op]
        for i in range(i1, i2):
            out[i] += value
    return out


# ----------------------------------------------------------------------------------------------- the reward source
class Rewriter:
    """A causal LM that rewrites: the greedy continuation of its input text, through
    :class:`alignflow.rollout.HFEngine`. The input is tokenised as ``alignflow sft`` tokenises a plain-text
    prompt (:func:`alignflow.data.render.encode_prompt`), its last tokens kept when it is too long."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 64):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, int(max_new_tokens)
        self.engine = HFEngine(model, tokenizer)
        self.limit = int(getattr(model.config, "max_position_embeddings", 4096)) - self.max_new_tokens

    @classmethod
    def from_path(cls, path: str, device="cpu", max_new_tokens: int = 64) -> Rewriter:
        model = load_causal_lm(ModelConfig(name_or_path=path), device)
        model.requires_grad_(False)
        return cls(model.eval(), load_tokenizer(path), max_new_tokens)

    def rewrite(self, texts: list[str]) -> list[str]:
        if not texts:
            return []
        ids = [encode_prompt(self.tokenizer, t, self.limit) for t in texts]
        out = self.engine.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=self.max_new_tokens))
        rows = [r[m.bool()].tolist() for r, m in zip(out["response_ids"], out["response_mask"], strict=True)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)


class Seq2SeqReward:
    """Token-level rewards from a rewriter: ``reward(batch) -> (B,)`` the sum of each row's token rewards, and
    ``last_fields["token_scores"]`` (B, Tr) the rewards themselves on the response's tokens (aligned with
    ``response_mask``), which the RL reward role hands to the advantage step (``docs/seq2seq_rm.md``).

    rewriter: anything with ``rewrite(texts) -> list[str]``; tokenizer: the POLICY's tokenizer -- the rewrite is
    tokenised with it and aligned with the response's own token ids (without its final EOS, which gets 0);
    template: the rewriter's input, ``{prompt}`` and ``{response}`` filled in. Rewrites are cached per
    (prompt, response).
    """

    name = "seq2seq"

    def __init__(self, rewriter, tokenizer, template: str = "{prompt} {response} {prompt}", **weights: float):
        bad = set(weights) - {"keep", "delete", "replace", "insert"}
        if bad:
            raise ValueError(
                f"seq2seq reward: unknown token weights {sorted(bad)}; valid: keep, delete, replace, insert"
            )
        try:
            template.format(prompt="", response="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"seq2seq template {template!r} may only use {{prompt}} and {{response}} ({e})") from None
        self.rewriter, self.tokenizer, self.template, self.weights = rewriter, tokenizer, template, weights
        self.cache: dict = {}
        self.last_fields: dict = {}

    def _rewrites(self, prompts: list, responses: list[str]) -> list[str]:
        keys = [(prompt_text(p), r) for p, r in zip(prompts, responses, strict=True)]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        texts = [self.template.format(prompt=p, response=r) for p, r in todo]
        for k, out in zip(todo, self.rewriter.rewrite(texts), strict=True):
            self.cache[k] = out
        return [self.cache[k] for k in keys]

    def _response_ids(self, batch) -> list[list[int]]:
        eos = self.tokenizer.eos_token_id
        if "response_ids" in batch.tensors:
            ids, mask = batch["response_ids"], batch["response_mask"]
            rows = [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]
        else:
            rows = [self.tokenizer(r, add_special_tokens=False).input_ids for r in batch.meta["response"]]
        return [r[:-1] if r and r[-1] == eos else r for r in rows]

    def __call__(self, batch) -> torch.Tensor:
        rewrites = self._rewrites(list(batch.meta["prompt"]), list(batch.meta["response"]))
        rows = self._response_ids(batch)
        width = batch["response_mask"].shape[1] if "response_mask" in batch.tensors else max(map(len, rows), default=0)
        tok = torch.zeros(len(batch), width)
        for i, (resp, text) in enumerate(zip(rows, rewrites, strict=True)):
            target = self.tokenizer(text, add_special_tokens=False).input_ids
            values = edit_token_rewards(resp, target, **self.weights)
            tok[i, : len(values)] = torch.tensor(values, dtype=torch.float32)
        device = output_device(batch)
        self.last_fields = {"token_scores": tok.to(device)}
        return tok.sum(-1).to(device)


def build_seq2seq(cfg, rl_cfg, device="cpu", key: str = "reward.seq2seq") -> Seq2SeqReward:
    """A :class:`Seq2SeqReward` from a :class:`~alignflow.config.Seq2SeqRewardConfig`; the policy's tokenizer
    comes from ``rl_cfg.model``. ConfigError names ``key``."""

    if rl_cfg.reward.normalize != "none" or rl_cfg.reward.clip > 0:
        raise ConfigError(
            f"{key}: token rewards are placed as they are; reward.normalize and reward.clip would change the "
            "sequence reward only -- set reward.normalize=none and reward.clip=0"
        )
    m = rl_cfg.model
    policy_tok = load_tokenizer(m.tokenizer or m.name_or_path, m.revision, m.trust_remote_code)
    weights = {"keep": cfg.keep, "delete": cfg.delete, "replace": cfg.replace, "insert": cfg.insert}
    try:
        return Seq2SeqReward(
            Rewriter.from_path(cfg.model, device, cfg.max_new_tokens), policy_tok, cfg.template, **weights
        )
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
