"""From a path in the config to tokenised train/eval examples: load -> validate -> encode -> split.

One function so that every trainer reads data the same way (same validation, same truncation rules,
same bad-row policy and the same report of skipped rows).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from alignflow.config import ConfigError, DataConfig
from alignflow.data.formats import DataError, check_label_balance, validate
from alignflow.data.loading import load_records
from alignflow.data.render import encode_rows, set_chat_template

log = logging.getLogger("alignflow.data")


@dataclass
class PreparedData:
    format: str
    train: list[dict]
    eval: list[dict]
    reports: list[str] = field(default_factory=list)


def _read(path: str, split: str, cfg: DataConfig, tokenizer, expect: tuple[str, ...]) -> tuple[str, list, list]:
    records = load_records(path, split)
    checked = validate(records, fmt=cfg.format, on_bad_row=cfg.on_bad_row, source=path)
    if expect and checked.format not in expect:
        raise DataError(
            f"{path}: rows are in '{checked.format}' format, this command needs one of "
            f"{', '.join(expect)} (set data.format to force a format)"
        )
    encoded = encode_rows(checked, tokenizer, cfg, on_bad_row=cfg.on_bad_row)
    # Skipped rows are always reported; so are truncated ones (a user should know their max_len cuts data).
    reports = [
        r
        for r in (
            checked.summary() if checked.skipped else "",
            encoded.summary() if encoded.skipped or encoded.truncated else "",
        )
        if r
    ]
    for r in reports:
        log.warning(r)
    return checked.format, list(encoded.rows), reports


def prepare_data(cfg: DataConfig, tokenizer, expect: tuple[str, ...] = (), seed: int = 0) -> PreparedData:
    """Load ``cfg.path`` (and ``cfg.eval_path``), validate and tokenise; hold out ``eval_fraction`` when no eval path.

    ``cfg.chat_template`` (when set) replaces the tokenizer's chat template first, so the rows, the rollouts
    and the saved model all use it. Unpaired (KTO) training rows must hold both labels."""
    set_chat_template(tokenizer, cfg.chat_template)
    fmt, rows, reports = _read(cfg.path, cfg.split, cfg, tokenizer, expect)
    if fmt == "unpaired":
        check_label_balance(rows, cfg.path)
    if cfg.eval_path:
        _, eval_rows, more = _read(cfg.eval_path, cfg.split, cfg, tokenizer, expect)
        return PreparedData(fmt, rows, eval_rows, reports + more)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(cfg.eval_fraction * len(rows)))
    if n_eval and len(rows) - n_eval < 1:
        raise DataError(f"{cfg.path}: {len(rows)} rows are too few to hold out data.eval_fraction={cfg.eval_fraction}")
    held = set(order[:n_eval])
    return PreparedData(
        fmt, [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held], reports
    )


def check_objectives(data: PreparedData, num_objectives: int, loss: str, source: str) -> None:
    """``reward.num_objectives`` / ``reward.loss`` against the data: several objectives, or a regression, need
    ``rated`` rows, and ``num_objectives`` > 1 must equal the number of rated attributes (1 means: as the data
    says). ConfigError naming the keys and the file."""
    if data.format != "rated":
        if num_objectives > 1 or loss == "regression":
            key = f"reward.num_objectives={num_objectives}" if num_objectives > 1 else "reward.loss=regression"
            raise ConfigError(
                f"{key} needs rated rows (prompt, completions, ratings: one number per attribute); "
                f"{source} holds {data.format} rows, which give one objective: use "
                "reward.num_objectives=1 and reward.loss=bt, or rated data"
            )
        return
    rows = data.train or data.eval
    attributes = rows[0]["attributes"] if rows else []
    if num_objectives > 1 and num_objectives != len(attributes):
        raise ConfigError(
            f"reward.num_objectives={num_objectives}, but {source} rates {len(attributes)} attributes "
            f"({', '.join(attributes)}); set reward.num_objectives={len(attributes)} (or 1: as the "
            "data says)"
        )
