"""Format detection, validation (every kind of bad row, both policies) and the rated -> pairs conversion."""

import json

import pytest

from alignflow.data.formats import (
    FORMAT_FIELDS,
    DataError,
    Unparseable,
    detect_format,
    rated_to_pairs,
    rated_to_preference,
    validate,
)
from alignflow.data.loading import Record, load_records

USER = [{"role": "user", "content": "hello"}]
ASSISTANT_GOOD = [{"role": "assistant", "content": "good"}]
ASSISTANT_BAD = [{"role": "assistant", "content": "bad"}]

GOOD_ROWS = {  # format -> (standard row, conversational row)
    "lm": ({"text": "hello world"}, {"messages": USER + ASSISTANT_GOOD}),
    "prompt": ({"prompt": "hello"}, {"prompt": USER}),
    "prompt_completion": ({"prompt": "hello", "completion": "good"}, {"prompt": USER, "completion": ASSISTANT_GOOD}),
    "preference": (
        {"prompt": "hello", "chosen": "good", "rejected": "bad", "margin": 1.5},
        {"prompt": USER, "chosen": ASSISTANT_GOOD, "rejected": ASSISTANT_BAD},
    ),
    "ranked": (
        {"prompt": "hello", "responses": ["good", "fine", "bad"]},
        {"prompt": USER, "responses": [ASSISTANT_GOOD, ASSISTANT_BAD]},
    ),
    "unpaired": (
        {"prompt": "hello", "completion": "good", "label": True},
        {"prompt": USER, "completion": ASSISTANT_BAD, "label": False},
    ),
    "rated": (
        {
            "prompt": "hello",
            "completions": ["good", "bad"],
            "ratings": [{"helpful": 5, "honest": 4}, {"helpful": 1, "honest": 2}],
        },
        {"prompt": USER, "completions": [ASSISTANT_GOOD, ASSISTANT_BAD], "ratings": [{"helpful": 5}, {"helpful": 1}]},
    ),
}


def records(*rows):
    return [Record(f"d.jsonl:{i}", row) for i, row in enumerate(rows, 1)]


def test_format_table_covers_every_format():
    assert set(FORMAT_FIELDS) == set(GOOD_ROWS)


@pytest.mark.parametrize("fmt", list(GOOD_ROWS))
@pytest.mark.parametrize("form", [0, 1], ids=["standard", "conversational"])
def test_detect_and_validate_good_rows(fmt, form):
    row = GOOD_ROWS[fmt][form]
    assert detect_format(row) == fmt
    checked = validate(records(row, row))
    assert checked.format == fmt and checked.skipped == 0 and checked.where == ["d.jsonl:1", "d.jsonl:2"]
    assert checked.rows == [row, row]


def test_detect_format_unknown_fields_lists_the_formats():
    with pytest.raises(
        DataError,
        match=r"(?s)cannot tell the row format from its fields \['question'\].*"
        r"preference: prompt, chosen, rejected \[margin\]",
    ):
        detect_format({"question": "hi"})


def test_a_row_missing_a_field_is_still_detected_by_its_other_fields():
    """A preference row without 'rejected' is a bad preference row, not a good 'prompt' row."""
    assert detect_format({"prompt": "hello", "chosen": "good"}) == "preference"


BAD_ROWS = [  # (format, row, the expected "field '...': reason" text)
    ("preference", {"prompt": "hello", "chosen": "good"}, "field 'rejected': missing"),
    (
        "preference",
        {"prompt": "hello", "chosen": 3, "rejected": "bad"},
        "field 'chosen': expected a string or a list of messages, got int",
    ),
    ("preference", {"prompt": "hello", "chosen": "  ", "rejected": "bad"}, "field 'chosen': empty string"),
    (
        "preference",
        {"prompt": "hello", "chosen": "good", "rejected": "good"},
        "field 'rejected': identical to 'chosen'",
    ),
    (
        "preference",
        {"prompt": "hello", "chosen": "good", "rejected": "bad", "margin": "big"},
        "field 'margin': expected a finite number, got 'big'",
    ),
    (
        "preference",
        {"prompt": "hello", "chosen": "good", "rejected": "bad", "margin": True},
        "field 'margin': expected a finite number, got True",
    ),
    (
        "preference",
        {"prompt": USER, "chosen": "good", "rejected": ASSISTANT_BAD},
        "field 'chosen': expected a list of messages like the prompt, got a string",
    ),
    (
        "preference",
        {"prompt": "hello", "chosen": ASSISTANT_GOOD, "rejected": "bad"},
        "field 'chosen': expected a string like the prompt, got a list",
    ),
    ("prompt", {"prompt": []}, "field 'prompt': empty message list"),
    ("prompt", {"prompt": [{"role": "user", "content": ""}]}, "field 'prompt': message 1: empty content"),
    ("prompt", {"prompt": [{"role": "user"}]}, "field 'prompt': message 1: missing 'content'"),
    (
        "prompt",
        {"prompt": [{"role": 1, "content": "hello"}]},
        "field 'prompt': message 1: 'role' must be a string, got int",
    ),
    (
        "prompt",
        {"prompt": ["hello"]},
        "field 'prompt': message 1: expected an object with 'role' and 'content', got str",
    ),
    ("lm", {"text": "hello", "messages": USER}, "fields ['text', 'messages']: give exactly one of them"),
    ("lm", {"text": None}, "field 'text' or 'messages': missing"),
    ("ranked", {"prompt": "hello", "responses": ["good"]}, "field 'responses': needs at least 2 responses, got 1"),
    ("ranked", {"prompt": "hello", "responses": ["good", ""]}, "field 'responses': response 2: empty string"),
    ("ranked", {"prompt": "hello", "responses": "good"}, "field 'responses': expected a list of responses, got str"),
    (
        "unpaired",
        {"prompt": "hello", "completion": "good", "label": "maybe"},
        "field 'label': expected a boolean (true/false or 1/0), got 'maybe'",
    ),
    (
        "unpaired",
        {"prompt": "hello", "completion": "good", "label": 2},
        "field 'label': expected a boolean (true/false or 1/0), got 2",
    ),
    (
        "rated",
        {"prompt": "hello", "completions": ["good", "bad"], "ratings": [{"helpful": 5}]},
        "field 'ratings': 1 ratings for 2 completions",
    ),
    (
        "rated",
        {"prompt": "hello", "completions": ["good", "bad"], "ratings": [{"helpful": 5}, {"helpful": "N/A"}]},
        "field 'ratings': rating 2: attribute 'helpful' is not a finite number: 'N/A'",
    ),
    (
        "rated",
        {"prompt": "hello", "completions": ["good", "bad"], "ratings": [{"helpful": 5}, {"honest": 1}]},
        "field 'ratings': rating 2 rates ['honest'], rating 1 rates ['helpful']",
    ),
]


@pytest.mark.parametrize("fmt,row,problem", BAD_ROWS, ids=[p for _, _, p in BAD_ROWS])
def test_each_bad_row_kind_names_location_and_field(fmt, row, problem):
    """The bad row is the 2nd of three; the report names its line and field, and the good rows are kept."""
    good = GOOD_ROWS[fmt][0] if not isinstance(row.get("prompt"), list) else GOOD_ROWS[fmt][1]
    with pytest.raises(DataError) as error:
        validate(records(good, row, good), fmt=fmt)
    assert f"d.jsonl:2: {problem}\n" in str(error.value)
    assert "1 of 3 rows are bad (1 problems)" in str(error.value)
    checked = validate(records(good, row, good), fmt=fmt, on_bad_row="skip")
    assert checked.rows == [good, good] and checked.where == ["d.jsonl:1", "d.jsonl:3"]
    assert checked.skipped == 1 and checked.examples == [f"d.jsonl:2: {problem}"]


def test_invalid_json_line_is_reported_with_file_line_and_json_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps(GOOD_ROWS["preference"][0])
    path.write_text(f'{good}\n{{"prompt": "hello", "chosen": }}\n{good}\n[1]\n')
    with pytest.raises(DataError) as error:
        validate(load_records(str(path)), source=str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: 2 of 4 rows are bad (2 problems):\n")
    assert f"{path}:2: invalid JSON: Expecting value: line 1 column 31 (char 30)\n" in message
    assert f"{path}:4: expected a JSON object, got an array\n" in message


def test_bad_rows_in_a_csv_file_name_the_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nhello,good,bad\nhello,,bad\nhello,same,same\n")
    with pytest.raises(DataError) as error:
        validate(load_records(str(path)), source=str(path))
    assert f"{path}:3: field 'chosen': missing\n" in str(error.value)
    assert f"{path}:4: field 'rejected': identical to 'chosen'\n" in str(error.value)


def test_several_problems_of_one_row_are_all_reported():
    with pytest.raises(DataError) as error:
        validate(records({"prompt": "", "chosen": 1, "rejected": "bad"}), fmt="preference")
    assert "d.jsonl:1: field 'prompt': empty string\n  d.jsonl:1: field 'chosen': expected a string" in str(error.value)
    assert "1 of 1 rows are bad (2 problems)" in str(error.value)


def test_error_mode_lists_the_first_ten_problems_and_the_count():
    good = GOOD_ROWS["prompt_completion"][0]
    rows = [good] + [{"prompt": "hello", "completion": ""}] * 12
    with pytest.raises(DataError) as error:
        validate(records(*rows), source="sft.jsonl")
    lines = str(error.value).splitlines()
    assert lines[0] == "sft.jsonl: 12 of 13 rows are bad (12 problems):"
    assert lines[1:11] == [f"  d.jsonl:{i}: field 'completion': empty string" for i in range(2, 12)]
    assert lines[11] == "  ... and 2 more"
    assert "data.on_bad_row=skip" in lines[12]


def test_skip_mode_keeps_good_rows_and_reports_count_and_examples():
    good = GOOD_ROWS["prompt_completion"][0]
    rows = [
        good,
        {"prompt": "hello"},
        good,
        Unparseable("invalid JSON: oops"),
        {"prompt": 1, "completion": "x"},
        {"prompt": "a", "completion": ""},
        {"prompt": "b", "completion": "  "},
        {"prompt": "c"},
        good,
    ]
    checked = validate(records(*rows), fmt="prompt_completion", on_bad_row="skip", source="sft.jsonl")
    assert checked.rows == [good] * 3 and checked.where == ["d.jsonl:1", "d.jsonl:3", "d.jsonl:9"]
    assert checked.skipped == 6
    assert checked.examples == [
        "d.jsonl:2: field 'completion': missing",
        "d.jsonl:4: invalid JSON: oops",
        "d.jsonl:5: field 'prompt': expected a string or a list of messages, got int",
        "d.jsonl:6: field 'completion': empty string",
        "d.jsonl:7: field 'completion': empty string",
    ]
    summary = checked.summary()
    assert summary.startswith("sft.jsonl: 3 prompt_completion rows kept, 6 rows skipped\n")
    assert "d.jsonl:4: invalid JSON: oops" in summary


def test_all_rows_bad_is_an_error_even_in_skip_mode():
    with pytest.raises(DataError, match=r"2 of 2 rows are bad.*\n.*\n.*\nevery row is bad"):
        validate(records({"prompt": "hello", "chosen": "a"}, {"prompt": "hello", "rejected": "b"}), on_bad_row="skip")


def test_only_unparseable_records_are_all_bad():
    with pytest.raises(DataError, match="every row is bad"):
        validate(records(Unparseable("invalid JSON: x")), on_bad_row="skip")


def test_normalisation_of_label_and_margin_keeps_other_columns():
    rows = validate(
        records(
            {"prompt": "p", "completion": "c", "label": "True", "id": 7},
            {"prompt": "p", "completion": "c", "label": 0, "id": 8},
        )
    )
    assert [r["label"] for r in rows.rows] == [True, False] and [r["id"] for r in rows.rows] == [7, 8]
    pairs = validate(
        records(
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "0.5"},
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": None},
        )
    )
    assert pairs.rows[0]["margin"] == 0.5 and pairs.rows[1]["margin"] is None


def test_rated_rows_must_all_rate_the_same_attributes():
    first = GOOD_ROWS["rated"][0]
    other = {"prompt": "hi", "completions": ["a", "b"], "ratings": [{"helpful": 1}, {"helpful": 2}]}
    with pytest.raises(
        DataError,
        match=r"d.jsonl:2: field 'ratings': rates \['helpful'\], but d.jsonl:1 rates "
        r"\['helpful', 'honest'\]",
    ):
        validate(records(first, other))


def test_bad_arguments_name_the_choices():
    with pytest.raises(DataError, match="data.format='pairs' is not one of auto, lm, prompt, prompt_completion"):
        validate(records({"text": "a"}), fmt="pairs")
    with pytest.raises(DataError, match="on_bad_row='drop' is not one of error, skip"):
        validate(records({"text": "a"}), on_bad_row="drop")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        validate([], source="empty.jsonl")


# ----------------------------------------------------------------------------------------------- rated -> pairs
RATED = {
    "prompt": "hello",
    "completions": ["a", "b", "c", "d"],
    "source": "x",
    "ratings": [
        {"helpful": 3, "honest": 5},
        {"helpful": 5, "honest": 1},
        {"helpful": 1, "honest": 2},
        {"helpful": 5, "honest": 4},
    ],
}


def test_rated_to_pairs_mean_score_best_against_worst():
    """Means: a = (3+5)/2 = 4, b = (5+1)/2 = 3, c = (1+2)/2 = 1.5, d = (5+4)/2 = 4.5.
    chosen = d (4.5), rejected = c (1.5), margin = 4.5 - 1.5 = 3.0; other fields are kept."""
    assert rated_to_pairs(RATED) == [{"prompt": "hello", "source": "x", "chosen": "d", "rejected": "c", "margin": 3.0}]


def test_rated_to_pairs_one_attribute_first_of_equals():
    """helpful: a=3, b=5, c=1, d=5 -> b and d tie for best; the first (b) wins; rejected c; margin 5 - 1 = 4.
    honest: a=5, b=1, c=2, d=4 -> chosen a, rejected b, margin 5 - 1 = 4."""
    (helpful,) = rated_to_pairs(RATED, "helpful")
    assert (helpful["chosen"], helpful["rejected"], helpful["margin"]) == ("b", "c", 4.0)
    (honest,) = rated_to_pairs(RATED, "honest")
    assert (honest["chosen"], honest["rejected"], honest["margin"]) == ("a", "b", 4.0)


def test_rated_to_pairs_no_pair_at_or_below_min_gap():
    """Mean gap is 3.0 (see above): min_gap 3.0 gives no pair, 2.9 gives one; equal scores never pair."""
    assert rated_to_pairs(RATED, min_gap=3.0) == []
    assert len(rated_to_pairs(RATED, min_gap=2.9)) == 1
    tie = {"prompt": "p", "completions": ["a", "b"], "ratings": [{"h": 2}, {"h": 2}]}
    assert rated_to_pairs(tie) == [] and rated_to_pairs(tie, min_gap=-1.0) == []


def test_rated_to_pairs_unknown_attribute():
    with pytest.raises(DataError, match=r"field 'ratings': no attribute 'funny' \(rated: helpful, honest\)"):
        rated_to_pairs(RATED, "funny")


def test_rated_to_preference_counts_rows_without_a_pair():
    tie = {"prompt": "p", "completions": ["a", "b"], "ratings": [{"helpful": 2, "honest": 2}] * 2}
    rated = validate(records(RATED, tie, RATED))
    pairs = rated_to_preference(rated)
    assert pairs.format == "preference" and pairs.where == ["d.jsonl:1", "d.jsonl:3"]
    assert [p["margin"] for p in pairs.rows] == [3.0, 3.0]
    assert pairs.skipped == 1 and pairs.examples == ["d.jsonl:2: field 'ratings': score gap 0 <= min_gap 0, no pair"]
    assert validate(records(*pairs.rows), fmt="preference").rows == pairs.rows  # the pairs are valid preference rows
    with pytest.raises(DataError, match="no rated row has a score gap above min_gap=5"):
        rated_to_preference(rated, min_gap=5.0)
