"""Reward models with their own tokenizer: decoded rollout text re-rendered for the reward model.

A reward model trained with another tokenizer (another vocabulary, or the same vocabulary with another chat
template) cannot read the policy's token ids. For such a member the scorer re-renders each row from its texts,
the batch's meta ``prompt`` (a string or a list of chat messages) and ``response`` (the decoded response):

* string prompt: ``rm_tok(prompt)`` (with the reward model's special tokens, e.g. BOS), then
  ``rm_tok(response, add_special_tokens=False) + [eos]`` -- exactly how ``alignflow rm`` tokenised its
  training pairs (:func:`alignflow.data.render.encode_pair`);
* message-list prompt: the reward model's chat template applied to the whole conversation ``prompt +
  [{"role": "assistant", "content": response}]`` (for a template that only appends, the same ids as training).

Rows longer than the reward model's positions: a string row keeps its last prompt tokens and first response
tokens (the data pipeline's truncation rule); a conversation keeps its last tokens (the reward model reads the
last one). :func:`same_tokenizer` decides whether token ids can be scored as they are:
the same vocabulary (token -> id), the same special tokens and the same chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignflow.data.formats import DataError
from alignflow.data.render import chat_ids, encode_pair
from alignflow.models import ModelLoadError, load_tokenizer

RESPONSE_ROLE = "assistant"


def tokenizer_signature(tok) -> tuple:
    """What must match for two tokenizers to give the same ids to the same rendered text."""
    specials = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return tok.get_vocab(), specials, getattr(tok, "chat_template", None)


def same_tokenizer(a, b) -> bool:
    """True when ids from ``a`` mean the same tokens, specials and chat rendering under ``b``."""
    if a is b:
        return True
    return tokenizer_signature(a) == tokenizer_signature(b)


def load_rm_tokenizer(path: str, revision: str = "main", trust_remote_code: bool = False):
    """The tokenizer saved with a reward model (``alignflow rm`` saves it next to the weights); None when the
    directory has none."""

    try:
        return load_tokenizer(path, revision, trust_remote_code)
    except (ModelLoadError, OSError, ValueError):
        return None


class TextRenderer:
    """Renders (prompt, response) texts into one reward model's token ids: ``encode(prompts, responses)``."""

    def __init__(self, tokenizer, max_len: int, name: str = "reward model"):
        if tokenizer.eos_token_id is None:
            raise DataError(f"{name}: its tokenizer has no eos_token, which ends every rendered response")
        self.tokenizer, self.max_len, self.name = tokenizer, int(max_len), name

    def encode_one(self, prompt: Any, response: str) -> list[int]:
        if isinstance(prompt, str):
            enc = encode_pair(self.tokenizer, prompt, response, self.max_len - 1, self.max_len)
        elif isinstance(prompt, (list, tuple)):  # the whole conversation; the last max_len tokens are kept
            ids = chat_ids(self.tokenizer, list(prompt) + [{"role": RESPONSE_ROLE, "content": response}])
            return ids[-self.max_len :]
        else:
            raise DataError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
        return enc.input_ids

    def encode(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[list[int]]:
        if len(prompts) != len(responses):
            raise DataError(f"{self.name}: {len(prompts)} prompts but {len(responses)} responses")
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            if not isinstance(r, str):
                raise DataError(f"{self.name}: row {i}: the response must be a string, got {type(r).__name__}")
            try:
                out.append(self.encode_one(p, r))
            except DataError as e:
                raise DataError(f"{self.name}: row {i} cannot be rendered with its tokenizer: {e}") from None
        return out


def texts_of(batch, name: str) -> tuple[list, list]:
    """The batch's meta ``prompt`` and ``response`` lists; an error naming the scorer when either is missing."""
    missing = [k for k in ("prompt", "response") if k not in batch.meta]
    if missing:
        raise KeyError(
            f"{name}: a reward model with its own tokenizer re-renders the texts, and the batch has no "
            f"meta {', '.join(missing)} (it has {sorted(batch.keys())})"
        )
    return list(batch.meta["prompt"]), list(batch.meta["response"])


def max_positions(model, default: int = 4096) -> int:
    """The longest sequence a model reads (its ``max_position_embeddings``), else ``default``."""
    cfg = getattr(model, "config", None)
    n: int | None = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else default
