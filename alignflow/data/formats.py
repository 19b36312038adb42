"""Row formats, format detection and validation with a bad-row policy.

Every format exists in two forms (TRL's conventions): *standard*, where texts are strings, and
*conversational*, where texts are lists of ``{"role", "content"}`` messages. A row's form is decided
by its ``prompt`` (or ``text``/``messages`` for ``lm``); every other text field must then use the same form.

=================  ================================================  =====================================
format             fields                                            used by
=================  ================================================  =====================================
lm                 ``text`` (standard) or ``messages`` (conv.)       SFT on whole sequences
prompt             ``prompt``                                        online RL (PPO, GRPO, ...)
prompt_completion  ``prompt``, ``completion``                        SFT on responses
preference         ``prompt``, ``chosen``, ``rejected`` [``margin``]  reward models, DPO family
ranked             ``prompt``, ``responses`` (best first, >= 2)      PRO
unpaired           ``prompt``, ``completion``, ``label`` (bool)      KTO
rated              ``prompt``, ``completions``, ``ratings``          regression RMs, UltraFeedback style
=================  ================================================  =====================================

``validate`` checks every row, and reports each problem as ``"<location>: field 'chosen': <reason>"``.
With ``on_bad_row="error"`` any problem stops the run with the first ten problems and the count; with
``"skip"`` the bad rows are dropped, counted and the first five problems kept for ``summary()``. A data
set with no good row is an error in both modes. See ``docs/data.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the field."""


class FormatSpec(NamedTuple):
    required: tuple[str, ...]  # "a|b" means exactly one of a and b
    optional: tuple[str, ...] = ()


FORMAT_FIELDS: dict[str, FormatSpec] = {
    "lm": FormatSpec(("text|messages",)),
    "prompt": FormatSpec(("prompt",)),
    "prompt_completion": FormatSpec(("prompt", "completion")),
    "preference": FormatSpec(("prompt", "chosen", "rejected"), optional=("margin",)),
    "ranked": FormatSpec(("prompt", "responses")),
    "unpaired": FormatSpec(("prompt", "completion", "label")),
    "rated": FormatSpec(("prompt", "completions", "ratings")),
}

# Detection: the first format (most specific first) that has any of its telltale fields.
_TELLTALE_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("rated", ("ratings", "completions")),
    ("ranked", ("responses",)),
    ("preference", ("chosen", "rejected")),
    ("unpaired", ("label",)),
    ("prompt_completion", ("completion",)),
    ("lm", ("text", "messages")),
    ("prompt", ("prompt",)),
)

MAX_ERROR_LINES = 10
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Unparseable:
    """Stands in for the row of a record that could not be read (e.g. an invalid JSON line)."""

    reason: str


def format_table() -> str:
    """One line per format: ``name: field, field [optional]``."""
    lines = []
    for name, spec in FORMAT_FIELDS.items():
        fields = ", ".join(f.replace("|", " | ") for f in spec.required)
        extra = f" [{', '.join(spec.optional)}]" if spec.optional else ""
        lines.append(f"  {name}: {fields}{extra}")
    return "\n".join(lines)


def detect_format(row: dict) -> str:
    """The format of ``row`` from its field names (see ``_TELLTALE_FIELDS``); DataError when none fits."""
    for name, telltales in _TELLTALE_FIELDS:
        if any(row.get(f) is not None for f in telltales):
            return name
    raise DataError(f"cannot tell the row format from its fields {sorted(row)}; the formats are:\n{format_table()}")


# ----------------------------------------------------------------------------------------------- field checks
# Each check takes (value, conversational) and returns (normalised value, problem or None).
# ``conversational`` is True/False when the row's form is known, None when it is not.
Check = Callable[[Any, bool | None], tuple[Any, str | None]]


def _type_name(value: Any) -> str:
    return type(value).__name__


# Roles that chat templates know. Others (e.g. ShareGPT's "human"/"gpt") make most templates fail or, worse,
# render something the model never saw; they are reported at validation, before any tokenisation.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
_ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant"}


def _unicode_problem(text: str) -> str | None:
    """A lone surrogate (e.g. from a JSON escape ``\\ud800``) cannot be encoded as UTF-8, so no tokenizer can
    read the text; say where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"lone surrogate {text[e.start]!a} at character {e.start + 1} is not valid Unicode text"
    return None


def _check_role(role: str) -> str | None:
    if role in CHAT_ROLES:
        return None
    hint = f" (use '{_ROLE_HINTS[role.lower()]}')" if role.lower() in _ROLE_HINTS else ""
    return f"role {role!r} is not one of {', '.join(CHAT_ROLES)}{hint}"


def _check_messages(value: Any, conversational: bool | None = True) -> tuple[Any, str | None]:
    if not isinstance(value, list):
        return value, f"expected a list of messages, got {_type_name(value)}"
    if not value:
        return value, "empty message list"
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            return value, f"message {i}: expected an object with 'role' and 'content', got {_type_name(message)}"
        for key in ("role", "content"):
            if message.get(key) is None:
                return value, f"message {i}: missing '{key}'"
            if not isinstance(message[key], str):
                return value, f"message {i}: '{key}' must be a string, got {_type_name(message[key])}"
            if not message[key].strip():
                return value, f"message {i}: empty {key}"
            problem = _unicode_problem(message[key]) or (_check_role(message[key]) if key == "role" else None)
            if problem:
                return value, f"message {i}: {problem}"
    return value, None


def _check_text(value: Any, conversational: bool | None = False) -> tuple[Any, str | None]:
    if not isinstance(value, str):
        return value, f"expected a string, got {_type_name(value)}"
    if not value.strip():
        return value, "empty string"
    return value, _unicode_problem(value)


def _check_turn(value: Any, conversational: bool | None) -> tuple[Any, str | None]:
    """A string (standard rows) or a message list (conversational rows)."""
    if isinstance(value, str):
        if conversational:
            return value, "expected a list of messages like the prompt, got a string"
        return _check_text(value)
    if isinstance(value, list):
        if conversational is False:
            return value, "expected a string like the prompt, got a list"
        return _check_messages(value)
    return value, f"expected a string or a list of messages, got {_type_name(value)}"


def _check_turns(minimum: int, noun: str) -> Check:
    def check(value: Any, conversational: bool | None) -> tuple[Any, str | None]:
        if not isinstance(value, list):
            return value, f"expected a list of {noun}s, got {_type_name(value)}"
        if len(value) < minimum:
            return value, f"needs at least {minimum} {noun}s, got {len(value)}"
        for i, item in enumerate(value, 1):
            _, problem = _check_turn(item, conversational)
            if problem:
                return value, f"{noun} {i}: {problem}"
        return value, None

    return check


def _as_number(value: Any) -> float | None:
    """A finite float from a number or a numeric string; None when it is not one (booleans are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _check_margin(value: Any, conversational: bool | None) -> tuple[Any, str | None]:
    number = _as_number(value)
    return (number, None) if number is not None else (value, f"expected a finite number, got {value!r}")


_TRUE, _FALSE = ("true", "1", "1.0"), ("false", "0", "0.0")


def _check_label(value: Any, conversational: bool | None) -> tuple[Any, str | None]:
    if isinstance(value, bool):
        return value, None
    text = str(value).strip().lower() if isinstance(value, (str, int, float)) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE, None
    return value, f"expected a boolean (true/false or 1/0), got {value!r}"


def _check_ratings(value: Any, conversational: bool | None) -> tuple[Any, str | None]:
    """A list of {attribute: number} dicts, every one rating the same attributes."""
    if not isinstance(value, list) or not value:
        return value, f"expected a non-empty list of {{attribute: number}} objects, got {value!r:.80}"
    ratings = []
    for i, item in enumerate(value, 1):
        if not isinstance(item, dict) or not item:
            return value, f"rating {i}: expected a non-empty {{attribute: number}} object, got {item!r:.80}"
        scores = {str(k): _as_number(v) for k, v in item.items()}
        bad = [k for k, v in scores.items() if v is None]
        if bad:
            return value, f"rating {i}: attribute '{bad[0]}' is not a finite number: {item[bad[0]]!r}"
        if ratings and scores.keys() != ratings[0].keys():
            return value, f"rating {i} rates {sorted(scores)}, rating 1 rates {sorted(ratings[0])}"
        ratings.append(scores)
    return ratings, None


_FIELD_CHECKS: dict[str, Check] = {
    "text": _check_text,
    "messages": _check_messages,
    "prompt": _check_turn,
    "completion": _check_turn,
    "chosen": _check_turn,
    "rejected": _check_turn,
    "responses": _check_turns(2, "response"),
    "completions": _check_turns(1, "completion"),
    "label": _check_label,
    "margin": _check_margin,
    "ratings": _check_ratings,
}


# ----------------------------------------------------------------------------------------------- row checks
def _row_form(row: dict) -> bool | None:
    """True for conversational rows, False for standard ones, None when the prompt/text is absent."""
    for key in ("prompt", "messages", "text"):
        if isinstance(row.get(key), list):
            return True
        if isinstance(row.get(key), str):
            return False
    return None


def _cross_checks(fmt: str, row: dict) -> list[str]:
    """Checks between fields, run once every field is individually valid."""
    if fmt == "preference" and row["chosen"] == row["rejected"]:
        return ["field 'rejected': identical to 'chosen'"]
    if fmt == "ranked":  # a response ranked against itself teaches nothing and breaks the ranking losses' ties
        for i, response in enumerate(row["responses"]):
            if response in row["responses"][:i]:
                return [
                    f"field 'responses': response {i + 1} is identical to response "
                    f"{row['responses'].index(response) + 1}"
                ]
    if fmt == "rated" and len(row["ratings"]) != len(row["completions"]):
        return [f"field 'ratings': {len(row['ratings'])} ratings for {len(row['completions'])} completions"]
    return []


def _shared_prefix(chosen: Any, rejected: Any) -> int:
    """Length of the common start of two strings (characters) or message lists (whole messages)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def split_implicit_prompt(row: dict) -> tuple[dict, str | None]:
    """A preference row without ``prompt`` (TRL's implicit-prompt form): the shared start of ``chosen`` and
    ``rejected`` becomes the prompt and the rest of each the completions; returns (row, problem or None).

    Strings split where they first differ; when the prompt would end with a space, that space goes to the
    completions instead (``"Q: a" / "Q: b"`` -> prompt ``"Q:"``, completions ``" a"``/``" b"``), as TRL does.
    Message lists split at the first message that differs. Rows whose sides are not both strings or both lists
    are returned unchanged (their field checks report them).
    """
    chosen, rejected = row["chosen"], row["rejected"]
    if not (isinstance(chosen, str) and isinstance(rejected, str)) and not (
        isinstance(chosen, list) and isinstance(rejected, list)
    ):
        return row, None
    n = _shared_prefix(chosen, rejected)
    if isinstance(chosen, str) and n and chosen[n - 1] == " ":
        n -= 1
    if chosen == rejected:
        return row, "field 'rejected': identical to 'chosen'"
    if n == 0 or (isinstance(chosen, str) and not chosen[:n].strip()):
        return row, (
            "field 'prompt': missing, and 'chosen' and 'rejected' do not start the same way, so no "
            "implicit prompt can be taken from them"
        )
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if len(side) == n:
            return row, (
                f"field '{name}': the whole of it is the prompt shared with the other side, so it "
                "has no completion (give 'prompt' explicitly)"
            )
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}, None


def check_row(fmt: str, row: dict) -> tuple[dict, list[str]]:
    """Validate one row against ``fmt``: the normalised row (label -> bool, margin -> float) and its problems.

    A ``preference`` row without ``prompt`` gets one from the shared start of its two sides
    (``split_implicit_prompt``)."""
    if (
        fmt == "preference"
        and row.get("prompt") is None
        and row.get("chosen") is not None
        and row.get("rejected") is not None
    ):
        row, problem = split_implicit_prompt(row)
        if problem:
            return dict(row), [problem]
    spec, out, problems = FORMAT_FIELDS[fmt], dict(row), []
    conversational = _row_form(row)
    for name in spec.required:
        present = [n for n in name.split("|") if row.get(n) is not None]
        if not present:
            problems.append("field '" + name.replace("|", "' or '") + "': missing")
        elif len(present) > 1:
            problems.append(f"fields {present}: give exactly one of them")
    for name in spec.required + spec.optional:
        for part in name.split("|"):
            if row.get(part) is not None:
                out[part], problem = _FIELD_CHECKS[part](row[part], conversational)
                if problem:
                    problems.append(f"field '{part}': {problem}")
    return out, problems or _cross_checks(fmt, out)


def _same_attributes(row: dict, where: str, reference: dict) -> list[str]:
    """Rated rows must all rate the same attributes; ``reference`` remembers the first good row's."""
    attributes = sorted(row["ratings"][0])
    if not reference:
        reference.update(attributes=attributes, where=where)
    elif attributes != reference["attributes"]:
        return [
            f"field 'ratings': rates {attributes}, but {reference['where']} rates {reference['attributes']}; "
            "every row must rate the same attributes"
        ]
    return []


# ----------------------------------------------------------------------------------------------- policy
@dataclass
class ValidatedRows:
    """Rows that passed validation, their locations, and what was skipped."""

    rows: list[dict]
    where: list[str]
    format: str
    source: str = "data"
    skipped: int = 0
    examples: list[str] = field(default_factory=list)  # the first problems of skipped rows

    def summary(self) -> str:
        text = f"{self.source}: {len(self.rows)} {self.format} rows kept, {self.skipped} rows skipped"
        return text + "".join(f"\n  {e}" for e in self.examples)


def enforce_bad_row_policy(problems: Sequence[str], n_bad: int, n_rows: int, on_bad_row: str, source: str) -> None:
    """Raise DataError when there are bad rows and ``on_bad_row == "error"``, or when every row is bad."""
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row={on_bad_row!r} is not one of error, skip")
    if n_bad == 0:
        return
    if on_bad_row == "error" or n_bad >= n_rows:
        listed = "\n".join(f"  {p}" for p in problems[:MAX_ERROR_LINES])
        more = f"\n  ... and {len(problems) - MAX_ERROR_LINES} more" if len(problems) > MAX_ERROR_LINES else ""
        if n_bad >= n_rows:
            advice = "every row is bad, so there is nothing to use; check the file and data.format"
        else:
            advice = "fix the rows, or set data.on_bad_row=skip to drop them (their count is reported)"
        raise DataError(
            f"{source}: {n_bad} of {n_rows} rows are bad ({len(problems)} problems):\n{listed}{more}\n{advice}"
        )


def _resolve_format(records: Sequence, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FORMAT_FIELDS:
            raise DataError(f"data.format={fmt!r} is not one of auto, {', '.join(FORMAT_FIELDS)}")
        return fmt
    for where, row in records:
        if isinstance(row, dict):
            try:
                return detect_format(row)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
    return "lm"  # no readable row: every record is reported as bad below, whatever the format


def validate(records: Sequence, fmt: str = "auto", on_bad_row: str = "error", source: str = "data") -> ValidatedRows:
    """Check every record (``(where, row)`` pairs from ``load_records``) against one format.

    ``fmt="auto"`` detects the format from the first readable row. Problems are reported as
    ``"<where>: field 'name': reason"``; see the module docstring for the bad-row policy.
    """
    if not records:
        raise DataError(f"{source}: no rows")
    fmt = _resolve_format(records, fmt)
    result, problems, n_bad, reference = ValidatedRows([], [], fmt, source), [], 0, {}
    for where, row in records:
        clean, row_problems = (None, [row.reason]) if isinstance(row, Unparseable) else check_row(fmt, row)
        if not row_problems and fmt == "rated":
            row_problems = _same_attributes(clean, where, reference)
        if row_problems:
            n_bad += 1
            problems += [f"{where}: {p}" for p in row_problems]
        else:
            result.rows.append(clean)
            result.where.append(where)
    enforce_bad_row_policy(problems, n_bad, len(records), on_bad_row, source)
    result.skipped, result.examples = n_bad, problems[:MAX_EXAMPLES]
    return result


def check_label_balance(rows: Sequence[dict], source: str) -> None:
    """Unpaired (KTO) rows must hold both labels: with only desirable (or only undesirable) completions the
    loss has nothing to contrast and pushes every completion the same way. DataError naming the field."""
    labels = {bool(row["label"]) for row in rows}
    if len(labels) == 1:
        (label,) = labels
        raise DataError(
            f"{source}: field 'label': all {len(rows)} rows are labelled {str(label).lower()}; KTO "
            f"needs both desirable (true) and undesirable (false) completions"
        )


# ----------------------------------------------------------------------------------------------- rated -> pairs
def completion_scores(row: dict, attribute: str | None = None) -> list[float]:
    """One score per completion of a rated row: ``ratings[i][attribute]``, or the mean over attributes."""
    scores = []
    for rating in row["ratings"]:
        if attribute is None:
            scores.append(sum(rating.values()) / len(rating))
        elif attribute in rating:
            scores.append(float(rating[attribute]))
        else:
            raise DataError(f"field 'ratings': no attribute {attribute!r} (rated: {', '.join(sorted(rating))})")
    return scores


def rated_to_pairs(row: dict, attribute: str | None = None, min_gap: float = 0.0) -> list[dict]:
    """Binarise a validated ``rated`` row into at most one ``preference`` pair (UltraFeedback -> pairs).

    Each completion i gets the score ``s_i = ratings[i][attribute]``, or the mean of all its ratings when
    ``attribute`` is None. ``chosen`` is the best-scored completion and ``rejected`` the worst-scored one
    (the first of equals, so the result is deterministic; Zephyr, Tunstall et al. 2023, draws the rejected
    one at random among the others instead), and ``margin = s_chosen - s_rejected``. When the gap is
    ``<= min_gap`` the row gives no pair (``[]``): the caller counts those rows (``rated_to_preference``
    does). The row's other fields (e.g. ``prompt``) are kept.
    """
    scores = completion_scores(row, attribute)
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    gap = scores[best] - scores[worst]
    if best == worst or gap <= min_gap:
        return []
    pair = {k: v for k, v in row.items() if k not in ("completions", "ratings")}
    pair.update(chosen=row["completions"][best], rejected=row["completions"][worst], margin=gap)
    return [pair]


def rated_to_preference(rated: ValidatedRows, attribute: str | None = None, min_gap: float = 0.0) -> ValidatedRows:
    """``rated_to_pairs`` over a validated data set; rows with no pair are counted in ``skipped``."""
    if rated.format != "rated":
        raise DataError(f"{rated.source}: rated_to_preference needs rated rows, these are {rated.format}")
    out = ValidatedRows([], [], "preference", rated.source, rated.skipped, list(rated.examples))
    for row, where in zip(rated.rows, rated.where, strict=False):
        try:
            pairs = rated_to_pairs(row, attribute, min_gap)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        out.rows += pairs
        out.where += [where] * len(pairs)
        if not pairs:
            out.skipped += 1
            if len(out.examples) < MAX_EXAMPLES:
                gap = max(completion_scores(row, attribute)) - min(completion_scores(row, attribute))
                out.examples.append(f"{where}: field 'ratings': score gap {gap:g} <= min_gap {min_gap:g}, no pair")
    if not out.rows:
        raise DataError(f"{rated.source}: no rated row has a score gap above min_gap={min_gap:g}; no pairs")
    return out
