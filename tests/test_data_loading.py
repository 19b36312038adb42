"""load_records: every source type gives back its rows with locations a person can find."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.data.formats import DataError, Unparseable
from alignflow.data.loading import Record, load_records

ROWS = [
    {"prompt": "hello", "chosen": "good", "rejected": "bad"},
    {"prompt": "how are you", "chosen": "fine", "rejected": "bad"},
    {"prompt": "hi", "chosen": "hi there", "rejected": "bad"},
]


def test_jsonl_rows_and_line_locations(tmp_path):
    """Blank lines are not rows, and locations count physical lines from 1."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(f"{json.dumps(ROWS[0])}\n\n{json.dumps(ROWS[1])}\n{json.dumps(ROWS[2])}\n")
    records = load_records(str(path))
    assert records == [Record(f"{path}:1", ROWS[0]), Record(f"{path}:3", ROWS[1]), Record(f"{path}:4", ROWS[2])]
    where, row = records[0]  # a plain (where, row) pair
    assert (where, row) == (f"{path}:1", ROWS[0])


def test_jsonl_bad_lines_are_kept_as_unparseable_records(tmp_path):
    """Loading does not stop at a bad line: each one becomes a record carrying the JSON error."""
    path = tmp_path / "d.jsonl"
    path.write_text(f'{json.dumps(ROWS[0])}\n{{"prompt": "x",\n[1, 2]\n{json.dumps(ROWS[1])}\n"text"\n')
    records = load_records(str(path))
    assert [r.where for r in records] == [f"{path}:{i}" for i in range(1, 6)]
    assert records[0].row == ROWS[0] and records[3].row == ROWS[1]
    assert isinstance(records[1].row, Unparseable)
    assert records[1].row.reason.startswith("invalid JSON: Expecting property name")
    assert records[2].row == Unparseable("expected a JSON object, got an array")
    assert records[4].row == Unparseable("expected a JSON object, got a string")


@pytest.mark.parametrize("layout", ["list", "split", "data"])
def test_json_list_or_keyed_object(tmp_path, layout):
    path = tmp_path / "d.json"
    content = {"list": ROWS, "split": {"train": ROWS, "test": ROWS[:1]}, "data": {"data": ROWS}}[layout]
    path.write_text(json.dumps(content))
    assert load_records(str(path)) == [Record(f"{path}[{i}]", r) for i, r in enumerate(ROWS)]


def test_json_picks_the_requested_split(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS[:1]}))
    assert load_records(str(path), split="test") == [Record(f"{path}[0]", ROWS[0])]


def test_json_object_without_rows_names_the_keys(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(DataError, match=r"d\.json: expected a list of objects.*'train' or 'data'.*\['rows'\]"):
        load_records(str(path))


def test_json_with_one_object_per_line_is_read_as_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_records(str(path)) == [Record(f"{path}:{i + 1}", r) for i, r in enumerate(ROWS)]


def test_json_non_object_items_are_unparseable(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], 3]))
    assert load_records(str(path)) == [
        Record(f"{path}[0]", ROWS[0]),
        Record(f"{path}[1]", Unparseable("expected a JSON object, got a number")),
    ]


def test_csv_locations_count_the_header_as_line_one(tmp_path):
    """Row 0 is line 2; a quoted cell spanning two lines moves the next row's line number by one."""
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\nhello,good,bad\n"how\nare you",fine,bad\nhi,hi there,bad\n')
    records = load_records(str(path))
    assert [r.where for r in records] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert [r.row for r in records] == [ROWS[0], {**ROWS[1], "prompt": "how\nare you"}, ROWS[2]]


def test_csv_json_columns_are_parsed_and_text_columns_kept(tmp_path):
    """Cells of a column whose cells all look like JSON arrays/objects are parsed; '[INST] ...' text stays text;
    an empty cell is a missing value (None); numbers stay strings (validation converts known numeric fields)."""
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    path = tmp_path / "d.csv"
    path.write_text(
        "messages,note,margin\n"
        f'"{json.dumps(messages).replace(chr(34), chr(34) * 2)}",[INST] hi [/INST],0.5\n'
        '"[{""role"": ""user"", ""content"": ""x""}]",,\n'
    )
    records = load_records(str(path))
    assert records[0].row == {"messages": messages, "note": "[INST] hi [/INST]", "margin": "0.5"}
    assert records[1].row == {"messages": [{"role": "user", "content": "x"}], "note": None, "margin": None}


def test_csv_broken_json_cell_and_ragged_row_are_unparseable(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('responses,prompt\n"[""a"", ""b""]",hello\n"[""a"", ]",hi\n"[""a""]",x,extra\n')
    records = load_records(str(path))
    assert records[0].row == {"responses": ["a", "b"], "prompt": "hello"}
    assert records[1].where == f"{path}:3"
    assert records[1].row.reason.startswith("field 'responses': invalid JSON:")
    assert records[2] == Record(f"{path}:4", Unparseable("3 cells, the header has 2 columns"))


def test_parquet_rows_keep_nested_values(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "hello"}], "responses": ["a", "b"]},
        {"prompt": [{"role": "user", "content": "hi"}], "responses": ["c", "d"]},
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_records(str(path)) == [Record(f"{path}[row {i}]", r) for i, r in enumerate(rows)]


def test_save_to_disk_dataset_directory(tmp_path):
    path = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    assert load_records(str(path)) == [Record(f"{path}[row {i}]", r) for i, r in enumerate(ROWS)]


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path):
    path = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[1:])}
    ).save_to_disk(str(path))
    assert load_records(str(path), split="test") == [
        Record(f"{path}[test][row 0]", ROWS[1]),
        Record(f"{path}[test][row 1]", ROWS[2]),
    ]
    with pytest.raises(DataError, match=r"no split 'validation'; the splits are train, test"):
        load_records(str(path), split="validation")


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match=f"data file not found: {path}"):
        load_records(str(path))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'; use one of \.jsonl, \.json, \.csv"):
        load_records(str(path))


def test_unreachable_hub_id_says_what_was_tried():
    """Tests run offline (conftest), so a hub id cannot be reached."""
    with pytest.raises(
        DataError,
        match="'nobody/no-such-data' is neither an existing data file or directory "
        "nor a reachable hub data set with split 'train'",
    ):
        load_records("nobody/no-such-data")


def test_directory_of_data_files_goes_through_load_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_records(str(folder)) == [Record(f"{folder}[train][row {i}]", r) for i, r in enumerate(ROWS)]
    with pytest.raises(
        DataError, match=f"{folder}: datasets.load_dataset cannot read this directory with split 'test'"
    ):
        load_records(str(folder), split="test")
