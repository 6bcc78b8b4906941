"""Text from clients or the model server, made safe to print on a terminal or in a report.

A `model` field holding `ESC [ 1 A ESC [ 2 K` rewrites the operator's screen when printed raw;
a right-to-left override (U+202E) makes a report say something other than what it holds
(CVE-2021-42574, "Trojan Source"). Every C0 and C1 control character, DEL, and every
bidirectional formatting character (Unicode UAX #9: LRE, RLE, PDF, LRO, RLO, LRI, RLI, FSI,
PDI, LRM, RLM, ALM) is replaced by a visible escape: `\\x1b`, `\\u202e`.
"""

from __future__ import annotations

import re
from typing import Any

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every control and bidi formatting character shown as an escape."""
    return _UNSAFE.sub(_visible, text)


def _visible_unless_layout(match: re.Match[str]) -> str:
    return match.group() if match.group() in "\t\n" else _visible(match)


def escape_text(text: str) -> str:
    """`escape` for running text shown as it is meant to be read (a model's answer in a
    terminal): line feeds and tabs stay, every other control character is escaped."""
    return _UNSAFE.sub(_visible_unless_layout, text)


def escape_all(value: Any) -> Any:
    """`escape` applied to every string in a JSON-like value (keys included)."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {escape(str(k)): escape_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [escape_all(v) for v in value]
    return value
