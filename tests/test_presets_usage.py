"""What the README and pyproject promise a user: the Python API example runs as written, the tracker extras exist,
and configs/eval.yaml evaluates a model a fresh clone can build."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_api_example_runs_as_written(tmp_path, monkeypatch):
    """The README's ```python block, exec'd from a directory that has the repository's configs/, with 3 steps per
    run (appended to every load_config call) and tiny row counts: both runs finish and report what it prints."""
    import alignflow.config as config

    blocks = readme_python_blocks()
    assert len(blocks) == 1 and "load_config" in blocks[0] and "train_" in blocks[0]
    original = config.load_config

    def short(cls, path=None, overrides=None):
        return original(
            cls,
            path,
            [
                *(overrides or []),
                "train.max_steps=3",
                "train.progress=false",
                "task.num_sft=64",
                "task.num_pairs=64",
                "task.hidden_size=16",
                "task.intermediate_size=32",
                "task.num_layers=1",
                "task.num_heads=2",
            ],
        )

    monkeypatch.setattr(config, "load_config", short)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    printed = []
    exec(compile(blocks[0], "README.md", "exec"), {"print": lambda *a: printed.append(a)})
    model, accuracy = printed[0]
    assert model == Path("runs/api/sft/model") and (tmp_path / model / "config.json").is_file()
    assert 0.0 <= accuracy <= 1.0
    lines = (tmp_path / "runs/api/rm/metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line).get("step", 0) for line in lines) == 3


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_every_tracker_extra_named_in_an_error_exists_in_pyproject():
    """train.report_to's missing-package error tells the user to pip install 'alignflow[<extra>]'."""
    from alignflow.trainers.trackers import EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for tracker, extra in EXTRAS.items():
        assert extra in extras, f"pyproject.toml has no [{extra}] extra for train.report_to={tracker}"
        assert any(dep.startswith(tracker) for dep in extras[extra])
