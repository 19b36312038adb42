"""Relative links in README.md and docs/ resolve (scripts/check_links.py), and the checker catches broken ones."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_links.py"


def run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=60)


def test_repository_links_resolve():
    result = run(ROOT)
    assert result.returncode == 0, result.stdout


def test_checker_reports_missing_files_and_headings(tmp_path):
    """A missing page, a missing heading and a missing image are each reported with page and line; links to
    existing files and headings (including one with inline code and a repeated one), external links, and links
    inside code are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Top\n\n[ok](docs/a.md) [ok2](docs/a.md#what-run-returns) [web](https://example.org/x.md)\n"
        "[gone](docs/missing.md)\n`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    (tmp_path / "docs" / "a.md").write_text(
        "# A\n\n## What `run` returns\n\n## Notes\n\n## Notes\n\n"
        "[self](#notes-1) [bad](#nope) ![img](img/plot.png)\n[ref]: ../README.md#top\n",
        encoding="utf-8",
    )
    result = run(tmp_path)
    assert result.returncode == 1
    lines = sorted(result.stdout.splitlines())
    assert lines == [
        "README.md:4: docs/missing.md -> no such file docs/missing.md",
        "docs/a.md:9: #nope -> no heading '#nope' in a.md",
        "docs/a.md:9: img/plot.png -> no such file docs/img/plot.png",
    ]
