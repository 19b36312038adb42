"""Relative links in README.md and docs/ resolve, and docs pages named in the code exist (scripts/check_links.py);
the checker catches broken ones."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_links.py"
# fixture paths are joined at run time so that this file itself holds no mention of a page that does not exist
PAGE_A = "/".join(("docs", "a.md"))
GONE = "/".join(("docs", "missing.md"))


def run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=60)


def test_repository_links_resolve():
    result = run(ROOT)
    assert result.returncode == 0, result.stdout


def test_checker_reports_missing_files_and_headings(tmp_path):
    """A missing page, a missing heading, a missing image and a docs page named in a docstring that does not exist
    are each reported with file and line; links to existing files and headings (including one with inline code and a
    repeated one), external links, links inside code, and a placeholder like docs/<loss>.md are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "alignflow").mkdir()
    (tmp_path / "README.md").write_text(
        f"# Top\n\n[ok]({PAGE_A}) [ok2]({PAGE_A}#what-run-returns) [web](https://example.org/x.md)\n"
        f"[gone]({GONE})\n`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    (tmp_path / PAGE_A).write_text(
        "# A\n\n## What `run` returns\n\n## Notes\n\n## Notes\n\n"
        "[self](#notes-1) [bad](#nope) ![img](img/plot.png)\n[ref]: ../README.md#top\n",
        encoding="utf-8",
    )
    (tmp_path / "alignflow" / "m.py").write_text(
        f'"""Formulas: {PAGE_A}; per loss docs/<loss>.md."""\n# see {GONE}\n', encoding="utf-8"
    )
    result = run(tmp_path)
    assert result.returncode == 1
    lines = sorted(result.stdout.splitlines())
    assert lines == [
        f"README.md:4: {GONE} -> no such file {GONE}",
        f"alignflow/m.py:2: {GONE} -> no such page",
        f"{PAGE_A}:9: #nope -> no heading '#nope' in a.md",
        f"{PAGE_A}:9: img/plot.png -> no such file docs/img/plot.png",
    ]
