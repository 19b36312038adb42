"""The command line: help lists keys, user mistakes end with a one-line error (exit 2), no traceback."""

import json

from alignflow.cli import main


def test_help_lists_config_keys(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "train.micro_batch_tokens" in out and "data.on_bad_row" in out


def test_unknown_key_is_a_clean_error(capsys):
    assert main(["sft", "optim.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.learning_rate'" in err and "Traceback" not in err


def test_bad_data_row_names_file_line_and_field(reviews_task, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": "Review : the film", "completion": " was great ."}, {"prompt": "Review : the plot"}, "not json"]
    bad.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    code = main(
        [
            "sft",
            f"model.name_or_path={reviews_task.model_dir}",
            f"model.tokenizer={reviews_task.tokenizer_dir}",
            f"data.path={bad}",
            f"train.output_dir={tmp_path / 'out'}",
            "train.max_steps=1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.jsonl:2" in err and "completion" in err
    assert "bad.jsonl:3" in err


def test_skip_mode_reports_and_trains(reviews_task, tmp_path):
    bad = tmp_path / "mixed.jsonl"
    good = [json.loads(l) for l in open(reviews_task.sft_path)][:20]
    bad.write_text("\n".join([json.dumps(r) for r in good] + ['{"prompt": "", "completion": " x ."}']) + "\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                "sft",
                f"model.name_or_path={reviews_task.model_dir}",
                f"model.tokenizer={reviews_task.tokenizer_dir}",
                f"data.path={bad}",
                "data.on_bad_row=skip",
                f"train.output_dir={out}",
                "train.max_steps=2",
                "train.batch_size=4",
                "train.progress=false",
            ]
        )
        == 0
    )
    log = (out / "metrics.jsonl").read_text()
    assert "mixed.jsonl:21" in log and "1" in log


def test_missing_model_path_is_a_clean_error(tmp_path, capsys):
    code = main(
        [
            "sft",
            f"model.name_or_path={tmp_path / 'nope'}",
            f"data.path={tmp_path / 'x.jsonl'}",
            f"train.output_dir={tmp_path / 'run'}",
        ]
    )  # not runs/run inside the repository
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err
