"""Reading rows from files, ``save_to_disk`` directories and hub data sets, each with its location.

``load_records(path, split)`` returns ``Record(where, row)`` pairs. ``where`` says where the row came from,
in the form a person uses to find it:

=================================  =========================================
source                             where
=================================  =========================================
``data.jsonl``                     ``data.jsonl:7`` (1-based line)
``data.json``                      ``data.json[3]`` (index in the list)
``data.csv``                       ``data.csv:2`` (the header is line 1)
``data.parquet``                   ``data.parquet[row 3]``
``save_to_disk`` directory         ``dir[row 3]`` or ``dir[train][row 3]``
hub data set / other directory     ``owner/name[train][row 3]``
=================================  =========================================

Reading never stops at a bad row: a line that is not valid JSON, not a JSON object, not UTF-8 text, nested
deeper than ``MAX_DEPTH`` levels or holding a duplicate key becomes a record whose row is
``Unparseable(reason)``, so that ``validate`` reports it with the others (and ``data.on_bad_row=skip`` drops
only that row). A UTF-8 byte-order mark at the start of a file is accepted.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, NamedTuple

from alignflow.data.formats import DataError, Unparseable

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_DEPTH = 64  # deepest nesting of objects/arrays accepted in a row (real rows need 4 or 5)


class Record(NamedTuple):
    where: str
    row: dict | Unparseable


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


class _Duplicated(dict):
    """A JSON object that repeated a key (``json`` keeps the last value silently); ``key`` is the first repeat."""

    key: str = ""


def _object(pairs: list) -> dict:
    """``object_pairs_hook`` for ``json.loads``: marks objects with a repeated key instead of dropping values."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            out = _Duplicated(pairs)
            out.key = key
            return out
        seen[key] = value
    return seen


def _parse(text: str) -> Any:
    """``json.loads`` that keeps duplicate keys visible (see ``_Duplicated``); RecursionError -> ValueError."""
    try:
        return json.loads(text, object_pairs_hook=_object)
    except RecursionError:
        raise ValueError(f"nested too deeply (more than {MAX_DEPTH} levels of objects/arrays)") from None


def _structure_problem(value: Any) -> str | None:
    """A repeated key anywhere in ``value``, or nesting deeper than ``MAX_DEPTH``; None when neither."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"nested too deeply (more than {MAX_DEPTH} levels of objects/arrays)"
        if isinstance(item, _Duplicated):
            return f"duplicate key '{item.key}' in one object (JSON would keep only its last value)"
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack += [(child, depth + 1) for child in children if isinstance(child, (dict, list))]
    return None


def _as_record(where: str, value: Any) -> Record:
    if not isinstance(value, dict):
        return Record(where, Unparseable(f"expected a JSON object, got {_json_kind(value)}"))
    problem = _structure_problem(value)
    return Record(where, Unparseable(problem) if problem else value)


def _bad_bytes(text: str) -> str | None:
    """Where ``text`` (decoded with ``surrogateescape``) held bytes that are not UTF-8; None when it has none."""
    for column, char in enumerate(text, 1):
        if "\udc80" <= char <= "\udcff":
            return f"not UTF-8 text: byte 0x{ord(char) - 0xDC00:02x} at character {column}"
    return None


def _read_text(path: str) -> str:
    """The file's text; a leading byte-order mark is dropped and bytes that are not UTF-8 are kept as
    ``surrogateescape`` characters, so that only the rows holding them are reported."""
    return Path(path).read_bytes().decode("utf-8-sig", errors="surrogateescape")


def _load_jsonl(path: str, text: str) -> list[Record]:
    """One record per non-blank line; invalid lines become Unparseable records with the reason."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        where, bad = f"{path}:{number}", _bad_bytes(line)
        if bad:
            records.append(Record(where, Unparseable(bad)))
            continue
        try:
            records.append(_as_record(where, _parse(line)))
        except json.JSONDecodeError as e:
            records.append(Record(where, Unparseable(f"invalid JSON: {e}")))
        except ValueError as e:
            records.append(Record(where, Unparseable(str(e))))
    return records


def _load_json(path: str, split: str) -> list[Record]:
    """A list of objects, or an object holding the list under the split name or ``data``."""
    text = _read_text(path)
    bad = _bad_bytes(text)
    if bad:  # one JSON document: a bad byte spoils the whole file, so say on which line it is
        first = next(i for i, c in enumerate(text) if "\udc80" <= c <= "\udcff")
        raise DataError(
            f"{path}:{text.count(chr(10), 0, first) + 1}: {bad.split(' at ')[0]} (a .json file is "
            "one document, so this stops the whole file; use .jsonl to skip single rows)"
        )
    try:
        data = _parse(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values one after another: JSON lines under a .json name
            return _load_jsonl(path, text)
        raise DataError(f"{path}: invalid JSON: {e}") from None
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    if isinstance(data, dict):
        key = next((k for k in (split, "data") if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(
                f"{path}: expected a list of objects, or an object with a list under '{split}' or "
                f"'data'; found keys {sorted(data)}"
            )
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects, got {_json_kind(data)}")
    return [_as_record(f"{path}[{i}]", value) for i, value in enumerate(data)]


def _parses(text: str) -> bool:
    try:
        _parse(text)
        return True
    except ValueError:  # JSONDecodeError is a ValueError, and so is too deep a nesting here
        return False


def _json_column(values: list) -> bool:
    """A CSV column holds JSON when every non-empty cell looks like a JSON array or object and one parses
    (so that a text column such as ``[INST] hi [/INST]`` stays text, and a broken cell is still reported)."""
    cells = [v.strip() for v in values if v and v.strip()]
    return bool(cells) and all(c[0] + c[-1] in ("[]", "{}") for c in cells) and any(map(_parses, cells))


def _csv_row(header: list[str], cells: list[str], json_columns: set[str]) -> dict | Unparseable:
    if len(cells) != len(header):
        return Unparseable(f"{len(cells)} cells, the header has {len(header)} columns")
    row: dict = {}
    for name, cell in zip(header, cells, strict=False):
        bad = _bad_bytes(cell)
        if bad:
            return Unparseable(f"field '{name}': {bad}")
        row[name] = cell if cell != "" else None  # an empty cell is a missing value
        if name in json_columns and cell:
            try:
                row[name] = _parse(cell)
            except json.JSONDecodeError as e:
                return Unparseable(f"field '{name}': invalid JSON: {e}")
            except ValueError as e:
                return Unparseable(f"field '{name}': {e}")
            problem = _structure_problem(row[name])
            if problem:
                return Unparseable(f"field '{name}': {problem}")
    return row


def _load_csv(path: str) -> list[Record]:
    """Cells stay strings except JSON columns (lists/dicts such as ``messages``), which are parsed.

    Locations are physical line numbers (header = line 1), also when a quoted cell spans several lines.
    """
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty CSV file (no header line)")
        lines, rows, end = [], [], reader.line_num
        for cells in reader:
            lines.append(end + 1)
            rows.append(cells)
            end = reader.line_num
    bad = next((b for b in map(_bad_bytes, header) if b), None)
    if bad:
        raise DataError(f"{path}:1: header line: {bad}")
    json_columns = {name for i, name in enumerate(header) if _json_column([r[i] for r in rows if i < len(r)])}
    return [
        Record(f"{path}:{line}", _csv_row(header, cells, json_columns))
        for line, cells in zip(lines, rows, strict=False)
    ]


def _load_parquet(path: str) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        size = Path(path).stat().st_size
        what = "an empty file (0 bytes)" if size == 0 else f"not a readable Parquet file ({size} bytes)"
        raise DataError(f"{path}: {what}: {e}") from None
    return [Record(f"{path}[row {i}]", row) for i, row in enumerate(table.to_pylist())]


def _load_saved(path: str, split: str) -> list[Record]:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    import datasets

    data = datasets.load_from_disk(path)
    prefix = path
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split '{split}'; the splits are {', '.join(data)} (set data.split)")
        data, prefix = data[split], f"{path}[{split}]"
    return [Record(f"{prefix}[row {i}]", row) for i, row in enumerate(data.to_list())]


def _load_dataset(path: str, split: str, local: bool) -> list[Record]:
    """``datasets.load_dataset(path, split=split)``: a directory of data files, or a hub id."""
    import datasets

    try:
        data = datasets.load_dataset(path, split=split)
    except Exception as e:  # noqa: BLE001 -- datasets raises many types; all mean "cannot load this"
        what = (
            f"{path}: datasets.load_dataset cannot read this directory with split '{split}'"
            if local
            else f"{path!r} is neither an existing data file or directory nor a reachable hub data set with "
            f"split '{split}'"
        )
        raise DataError(f"{what} ({type(e).__name__}: {e})") from e
    return [Record(f"{path}[{split}][row {i}]", row) for i, row in enumerate(data.to_list())]


def load_records(path: str, split: str = "train") -> list[Record]:
    """Read every row of ``path``: a .jsonl/.json/.csv/.parquet file, a ``save_to_disk`` directory, a
    directory of data files, or a hub data set id (``datasets.load_dataset(path, split=split)``)."""
    local = Path(path)
    suffix = local.suffix.lower()
    if local.is_dir():
        if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
            return _load_saved(path, split)
        return _load_dataset(path, split, local=True)
    if local.is_file():
        if suffix not in FILE_SUFFIXES:
            raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(FILE_SUFFIXES)}")
        if suffix == ".jsonl":
            return _load_jsonl(path, _read_text(path))
        if suffix == ".json":
            return _load_json(path, split)
        return _load_csv(path) if suffix == ".csv" else _load_parquet(path)
    if suffix in FILE_SUFFIXES:
        raise DataError(f"data file not found: {path}")
    return _load_dataset(path, split, local=False)
