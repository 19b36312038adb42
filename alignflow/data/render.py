"""Tokenisation of validated rows, with one truncation rule used by every format.

Token ids of a (prompt, completion) pair:

* standard rows (strings): prompt = ``tokenizer(prompt)`` with the tokenizer's special tokens (e.g. BOS);
  completion = ``tokenizer(completion, add_special_tokens=False) + [eos]``.
* conversational rows (message lists): prompt = the chat template of the prompt messages with the
  generation prompt (so the assistant header belongs to the prompt); completion = what the template of
  ``prompt + completion`` adds after it. The template must render the prompt as a prefix of the whole
  conversation ("prefix-stable"), otherwise the row is reported.

Truncation (the only rule): the prompt keeps its LAST ``max_prompt_len`` tokens (the most recent turns
survive), then the completion is cut on the right so that prompt + completion <= ``max_len``. A
completion left with no token is a bad row (it has nothing to learn from). ``lm`` rows have no prompt:
they are cut on the right at ``max_len``.

``loss_mask`` is 1 on completion tokens and 0 on prompt tokens. For ``lm`` message lists with
``completion_only`` it is 1 on the tokens each assistant message adds (after its header), else all 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignflow.config import ConfigError, DataConfig
from alignflow.data.formats import MAX_EXAMPLES, DataError, ValidatedRows, enforce_bad_row_policy

Text = Any  # a string (standard rows) or a list of {"role", "content"} messages (conversational rows)


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is in the loss
    prompt_len: int  # leading tokens outside the loss
    truncated: bool = False  # whether the truncation rule removed tokens


@dataclass
class EncodedRows(ValidatedRows):
    """Tokenised rows (see ``encode_rows``). ``skipped``/``examples`` count rows dropped at tokenisation only;
    the validation report stays on the ``ValidatedRows``."""

    truncated: int = 0  # rows that lost tokens to the truncation rule

    def summary(self) -> str:
        text = (
            f"{self.source}: {len(self.rows)} {self.format} rows tokenised, {self.skipped} rows skipped, "
            f"{self.truncated} rows truncated"
        )
        return text + "".join(f"\n  {e}" for e in self.examples)


# ----------------------------------------------------------------------------------------------- token ids
def _ids(output: Any) -> list[int]:
    """Token ids from a tokenizer call: a list, or a dict/BatchEncoding holding ``input_ids`` (transformers 5
    returns a BatchEncoding from ``apply_chat_template(..., tokenize=True)``, 4.x a plain list)."""
    if isinstance(output, Mapping):
        output = output["input_ids"]
    if hasattr(output, "tolist"):
        output = output.tolist()
    if output and isinstance(output[0], list):  # a batch of one conversation
        (output,) = output
    return list(output)


def read_chat_template(value: str) -> str:
    """``data.chat_template`` as template text: the value itself when it holds Jinja markup (``{%`` or ``{{``),
    else the contents of the file it names. ConfigError for a missing file or a template that does not parse."""
    import jinja2

    text, origin = value, "data.chat_template"
    if "{%" not in value and "{{" not in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"data.chat_template: {value!r} is neither a Jinja template (no '{{%' or '{{{{') "
                "nor an existing file holding one"
            )
        text, origin = path.read_text(encoding="utf-8-sig"), f"data.chat_template ({path})"
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{origin}: not a valid Jinja template: line {e.lineno}: {e.message}") from None
    return text


def set_chat_template(tokenizer, value: str) -> None:
    """Replace the tokenizer's chat template with ``data.chat_template`` (a template or a file); "" keeps it."""
    if value:
        tokenizer.chat_template = read_chat_template(value)


def chat_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template.

    A template that refuses the messages (e.g. ``raise_exception`` on an unexpected role or order) gives a
    DataError with its message, so the row is reported (or skipped) like any other bad row."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "conversational rows need a tokenizer with a chat template, and this one has none (set data.chat_template)"
        )
    try:
        out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
    except Exception as e:  # noqa: BLE001 -- template code is user-supplied Jinja; any failure is about this row
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"the chat template rejected these messages: {message}") from None
    return _ids(out)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token, which ends every standard (string) completion")
    return tokenizer.eos_token_id


def _prompt_ids(tokenizer, prompt: Text) -> list[int]:
    if isinstance(prompt, str):
        return _ids(tokenizer(prompt, add_special_tokens=True))
    return chat_ids(tokenizer, prompt, add_generation_prompt=True)


def _extension(before: list[int], after: list[int]) -> list[int]:
    """The tokens ``after`` adds to ``before``; DataError when ``before`` is not a prefix of it."""
    if after[: len(before)] != before:
        raise DataError(
            "the chat template is not prefix-stable: rendering the conversation so far and then "
            "the whole conversation gives different leading tokens, so the response tokens cannot "
            "be told apart (use a template that only appends, or standard string rows)"
        )
    return after[len(before) :]


def _completion_ids(tokenizer, prompt: Text, prompt_ids: list[int], completion: Text) -> list[int]:
    """Completion tokens following the full (uncut) ``prompt_ids``."""
    if isinstance(prompt, str):
        return _ids(tokenizer(completion, add_special_tokens=False)) + [_eos_id(tokenizer)]
    return _extension(prompt_ids, chat_ids(tokenizer, list(prompt) + list(completion)))


# ----------------------------------------------------------------------------------------------- truncation
def _cut_prompt(prompt_ids: list[int], max_prompt_len: int) -> list[int]:
    """Keep the last ``max_prompt_len`` prompt tokens (the left end is cut)."""
    return prompt_ids[len(prompt_ids) - min(len(prompt_ids), max_prompt_len) :]


def _truncate(prompt_ids: list[int], completion_ids: list[int], max_prompt_len: int, max_len: int) -> Encoded:
    """THE truncation rule: left-cut the prompt to ``max_prompt_len``, then right-cut the completion so that
    the total fits ``max_len``."""
    prompt = _cut_prompt(prompt_ids, max_prompt_len)
    completion = completion_ids[: max(0, max_len - len(prompt))]
    if not completion_ids:
        raise DataError("the completion adds no tokens after the prompt")
    if not completion:
        raise DataError(
            f"completion truncated to nothing: the prompt keeps {len(prompt)} tokens "
            f"(max_prompt_len={max_prompt_len}) and max_len={max_len}; make max_len larger than "
            "max_prompt_len"
        )
    truncated = len(prompt) < len(prompt_ids) or len(completion) < len(completion_ids)
    return Encoded(prompt + completion, [0] * len(prompt) + [1] * len(completion), len(prompt), truncated)


def encode_pair(tokenizer, prompt: Text, completion: Text, max_prompt_len: int, max_len: int) -> Encoded:
    """Tokenise a (prompt, completion) pair and apply the truncation rule; loss mask 1 on the completion."""
    prompt_ids = _prompt_ids(tokenizer, prompt)
    return _truncate(prompt_ids, _completion_ids(tokenizer, prompt, prompt_ids, completion), max_prompt_len, max_len)


def encode_prompt(tokenizer, prompt: Text, max_prompt_len: int) -> list[int]:
    """Prompt token ids for generation (RL): same tokenisation and left cut as ``encode_pair``."""
    return _cut_prompt(_prompt_ids(tokenizer, prompt), max_prompt_len)


def _chat_with_mask(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Render a conversation incrementally: tokens each assistant message adds after its header get 1, others 0."""
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        is_assistant = message["role"] == "assistant"
        if is_assistant:  # the assistant header (generation prompt) is not part of the response
            header = _extension(ids, chat_ids(tokenizer, messages[:i], add_generation_prompt=True))
            ids, mask = ids + header, mask + [0] * len(header)
        added = _extension(ids, chat_ids(tokenizer, messages[: i + 1]))
        ids, mask = ids + added, mask + [int(is_assistant)] * len(added)
    return ids, mask


def encode_lm(tokenizer, text_or_messages: Text, max_len: int, completion_only: bool = True) -> Encoded:
    """Tokenise a whole sequence, cut on the right at ``max_len``.

    A string: its tokens (with the tokenizer's special tokens) + eos, all in the loss. A message list: the
    chat template; with ``completion_only`` only the assistant messages' tokens are in the loss.
    """
    if isinstance(text_or_messages, str):
        ids = _ids(tokenizer(text_or_messages, add_special_tokens=True)) + [_eos_id(tokenizer)]
        mask = [1] * len(ids)
    elif completion_only:
        ids, mask = _chat_with_mask(tokenizer, text_or_messages)
    else:
        ids = chat_ids(tokenizer, text_or_messages)
        mask = [1] * len(ids)
    kept_ids, kept_mask = ids[:max_len], mask[:max_len]
    if 1 not in kept_mask:
        raise DataError(
            f"no assistant tokens within max_len={max_len} (completion_only=true trains on assistant messages only)"
        )
    return Encoded(kept_ids, kept_mask, kept_mask.index(1), len(kept_ids) < len(ids))


# ----------------------------------------------------------------------------------------------- rows
def _labelled(label: str, fn: Callable, *args) -> Any:
    """Call ``fn``; a DataError it raises is prefixed with ``label`` (the field it concerns)."""
    try:
        return fn(*args)
    except DataError as e:
        raise DataError(f"{label}: {e}") from None


def _encode_completions(tokenizer, prompt: Text, completions: list[tuple[str, Text]], cfg: DataConfig) -> list[Encoded]:
    """Encode several completions of one prompt, tokenising the prompt once; labels name each completion's field."""
    prompt_ids = _labelled("field 'prompt'", _prompt_ids, tokenizer, prompt)

    def encode(completion: Text) -> Encoded:
        ids = _completion_ids(tokenizer, prompt, prompt_ids, completion)
        return _truncate(prompt_ids, ids, cfg.max_prompt_len, cfg.max_len)

    return [_labelled(label, encode, completion) for label, completion in completions]


def _encode_lm_row(tokenizer, row: dict, cfg: DataConfig) -> tuple[dict, bool]:
    name = "text" if row.get("text") is not None else "messages"
    enc = _labelled(f"field '{name}'", encode_lm, tokenizer, row[name], cfg.max_len, cfg.completion_only)
    return {"input_ids": enc.input_ids, "loss_mask": enc.loss_mask}, enc.truncated


def _encode_prompt_completion_row(tokenizer, row: dict, cfg: DataConfig) -> tuple[dict, bool]:
    (enc,) = _encode_completions(tokenizer, row["prompt"], [("field 'completion'", row["completion"])], cfg)
    mask = enc.loss_mask if cfg.completion_only else [1] * len(enc.input_ids)
    return {"input_ids": enc.input_ids, "loss_mask": mask}, enc.truncated


def _encode_prompt_row(tokenizer, row: dict, cfg: DataConfig) -> tuple[dict, bool]:
    """Other columns (e.g. a verifier's ``answer``) pass through for reward functions."""
    ids = _labelled("field 'prompt'", _prompt_ids, tokenizer, row["prompt"])
    kept = _cut_prompt(ids, cfg.max_prompt_len)
    return {**row, "prompt_ids": kept}, len(kept) < len(ids)


def _encode_preference_row(tokenizer, row: dict, cfg: DataConfig) -> tuple[dict, bool]:
    chosen, rejected = _encode_completions(
        tokenizer, row["prompt"], [("field 'chosen'", row["chosen"]), ("field 'rejected'", row["rejected"])], cfg
    )
    if chosen.input_ids == rejected.input_ids:
        raise DataError(f"field 'rejected': same tokens as 'chosen' once cut to max_len={cfg.max_len}")
    example = {
        "chosen_ids": chosen.input_ids,
        "chosen_mask": chosen.loss_mask,
        "rejected_ids": rejected.input_ids,
        "rejected_mask": rejected.loss_mask,
        "prompt_len": chosen.prompt_len,
        "margin": float(row["margin"]) if row.get("margin") is not None else 0.0,
    }
    if isinstance(row.get("user"), str):  # P-DPO's user embeddings (alignflow.trainers.po_users)
        example["user"] = row["user"]
    return example, chosen.truncated or rejected.truncated


def _encode_ranked_row(tokenizer, row: dict, cfg: DataConfig) -> tuple[dict, bool]:
    labelled = [(f"field 'responses' (response {i})", r) for i, r in enumerate(row["responses"], 1)]
    encs = _encode_completions(tokenizer, row["prompt"], labelled, cfg)
    example = {"responses_ids": [e.input_ids for e in encs], "responses_mask": [e.loss_mask for e in encs]}
    return example, any(e.truncated for e in encs)


def _encode_unpaired_row(tokenizer, row: dict, cfg: DataConfig) -> tuple[dict, bool]:
    (enc,) = _encode_completions(tokenizer, row["prompt"], [("field 'completion'", row["completion"])], cfg)
    return {"input_ids": enc.input_ids, "loss_mask": enc.loss_mask, "label": bool(row["label"])}, enc.truncated


def _encode_rated_row(tokenizer, row: dict, cfg: DataConfig) -> tuple[dict, bool]:
    labelled = [(f"field 'completions' (completion {i})", c) for i, c in enumerate(row["completions"], 1)]
    encs = _encode_completions(tokenizer, row["prompt"], labelled, cfg)
    attributes = sorted(row["ratings"][0])
    example = {
        "completions_ids": [e.input_ids for e in encs],
        "completions_mask": [e.loss_mask for e in encs],
        "ratings": [[float(r[a]) for a in attributes] for r in row["ratings"]],
        "attributes": attributes,
    }
    return example, any(e.truncated for e in encs)


ROW_ENCODERS: dict[str, Callable[[Any, dict, DataConfig], tuple[dict, bool]]] = {
    "lm": _encode_lm_row,
    "prompt": _encode_prompt_row,
    "prompt_completion": _encode_prompt_completion_row,
    "preference": _encode_preference_row,
    "ranked": _encode_ranked_row,
    "unpaired": _encode_unpaired_row,
    "rated": _encode_rated_row,
}


def encode_rows(
    validated: ValidatedRows, tokenizer, data_cfg: DataConfig, on_bad_row: str | None = None
) -> EncodedRows:
    """Tokenise every validated row by its format (see ``ROW_ENCODERS`` and ``docs/data.md`` for the keys).

    Rows that cannot be encoded (e.g. the completion truncated to nothing) are bad rows under the same
    policy as validation: ``on_bad_row`` (default ``data_cfg.on_bad_row``) "error" stops with a report
    naming row and field, "skip" drops and counts them.
    """
    on_bad_row = on_bad_row or data_cfg.on_bad_row
    encode = ROW_ENCODERS[validated.format]
    out = EncodedRows([], [], validated.format, validated.source)
    problems = []
    for row, where in zip(validated.rows, validated.where, strict=False):
        try:
            example, truncated = encode(tokenizer, row, data_cfg)
        except DataError as e:
            problems.append(f"{where}: {e}")
            continue
        out.rows.append(example)
        out.where.append(where)
        out.truncated += truncated
    enforce_bad_row_policy(problems, len(problems), len(validated.rows), on_bad_row, validated.source)
    out.skipped, out.examples = len(problems), problems[:MAX_EXAMPLES]
    return out
