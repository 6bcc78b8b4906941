"""Hash-locked requirements: whether a requirements file pins every package by its hashes.

pip's hash-checking mode (`pip install --require-hashes`) refuses a file in which any
requirement lacks `--hash=ALGO:HEX`, and then installs only files whose digest matches (pip
docs, "Secure installs"). Lock files written by `uv pip compile --generate-hashes` and
`pip-compile --generate-hashes` have this form: `name==version \\` followed by one
`--hash=sha256:...` line per published file. This module reads that form to refuse an
unhashed file with a sentence naming its lines before any venv is built.
"""

from __future__ import annotations

import re
from pathlib import Path

from sovereignd.errors import FileFormatError

_HASH = re.compile(r"(?:^|\s)--hash[=\s]+[A-Za-z0-9]+:[0-9a-fA-F]+")


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each requirement line, continuations joined, comments
    removed (pip's rules: `#` at the start or after whitespace; a trailing backslash
    continues)."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw)
        if not buf:
            start = lineno
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            out.append((start, buf.strip()))
        buf = ""
    if buf.strip():
        out.append((start, buf.strip()))
    return out


def unhashed(path: Path) -> list[str]:
    """Requirement lines of the file that carry no `--hash` (as `line N: text`).

    Raises FileFormatError when the file cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"cannot read the requirements: {exc}", source=str(path)) from exc
    found = []
    for lineno, line in logical_lines(text):
        if line.startswith("-") and not line.startswith(("-e", "--editable")):
            continue  # options (--index-url, --find-links, -c ...): no package of their own
        if not _HASH.search(line):
            found.append(f"line {lineno}: {line.split()[0]}")
    return found
