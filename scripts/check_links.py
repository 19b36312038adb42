#!/usr/bin/env python3
"""Check that every relative link in README.md and docs/**/*.md resolves, and every docs page the code names exists.

A link is ``[text](target)``, ``![alt](target)`` or a reference definition ``[label]: target``. Links with a scheme
(``https:``, ``mailto:``) are not followed. A relative target must name an existing file or directory, resolved
from the directory of the page that holds the link; a ``#fragment`` on a Markdown target (or a bare ``#fragment``)
must match a heading of that page, slugged the way GitHub slugs headings. Text inside fenced code blocks and inline
code spans is not a link.

Docstrings, comments and presets point readers to the project's pages as ``docs/<page>.md``: every such mention in
the Python, YAML and shell files under alignflow/, configs/, bench/, scripts/ and tests/ must name an existing file.

Usage: ``python scripts/check_links.py [ROOT]`` (ROOT defaults to the repository root). Prints one line per broken
link or mention, ``path:line: target -> reason``, and exits 1 when there is any, 0 otherwise.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
DOCS_MENTION = re.compile(r"(?<![\w/.-])docs/[\w./-]*\w\.md")
SOURCE_DIRS = ("alignflow", "configs", "bench", "scripts", "tests")
SOURCE_SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".toml"}


def pages(root: Path) -> list[Path]:
    """README.md and every Markdown file under docs/, in a stable order."""
    found = [root / "README.md"] if (root / "README.md").is_file() else []
    docs = root / "docs"
    if docs.is_dir():
        found += sorted(docs.rglob("*.md"))
    return found


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) for lines outside fenced code blocks, with inline code spans blanked if asked."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, CODE_SPAN.sub("", line) if blank_code else line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page; repeated headings get -1, -2, ... like GitHub."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8"), blank_code=False):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def targets(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link in the page's prose."""
    found = []
    for number, line in prose_lines(text):
        found += [(number, m.group(1)) for m in INLINE.finditer(line)]
        ref = REFERENCE.match(line)
        if ref:
            found.append((number, ref.group(1)))
    return found


def problem(page: Path, target: str, root: Path) -> str | None:
    """Why ``target`` (a link on ``page``) does not resolve, or None when it does."""
    if SCHEME.match(target):
        return None
    path_part, _, fragment = target.partition("#")
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.exists():
        return f"no such file {os.path.relpath(dest, root.resolve())}"
    if fragment and dest.suffix == ".md" and dest.is_file() and fragment.lower() not in anchors(dest):
        return f"no heading '#{fragment}' in {dest.name}"
    return None


def source_files(root: Path) -> list[Path]:
    """The code, preset and script files whose docs mentions are checked, in a stable order."""
    found: list[Path] = []
    for name in SOURCE_DIRS:
        if (root / name).is_dir():
            found += sorted(p for p in (root / name).rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())
    return found


def check(root: Path) -> list[str]:
    """One message per broken relative link or docs mention under ``root``."""
    errors = []
    for page in pages(root):
        for number, target in targets(page.read_text(encoding="utf-8")):
            reason = problem(page, target, root)
            if reason:
                errors.append(f"{page.relative_to(root)}:{number}: {target} -> {reason}")
    for path in source_files(root):
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            for mention in DOCS_MENTION.findall(line):
                if not (root / mention).is_file():
                    errors.append(f"{path.relative_to(root)}:{number}: {mention} -> no such page")
    return errors


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    errors = check(root)
    for line in errors:
        print(line)
    checked = len(pages(root)), len(source_files(root))
    print(f"check_links: {checked[0]} pages, {checked[1]} source files, {len(errors)} broken", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
