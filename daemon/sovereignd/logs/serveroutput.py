"""The model server's output: JSON lines in `server.log`, the last lines kept in memory.

Secrets the daemon knows (the internal key of the current start) and anything that looks like
a key (`failures.redact_text`) are replaced before a line is stored anywhere; lines a backend
is known to fill with prompt content are kept, redacted or dropped as `server.content_lines`
says.
"""

from __future__ import annotations

import collections
import re
import time

from sovereignd.logs.files import RotatingFile, utc_timestamp
from sovereignd.process.failures import redact_text

REDACTED = "[REDACTED]"
MAX_LINE = 16 * 1024


class ServerOutput:
    """Single writer of `server.log`, and the in-memory tail for diagnosis."""

    def __init__(self, file: RotatingFile | None, buffer_lines: int,
                 content_line: re.Pattern[str] | None = None, content_mode: str = "redact") -> None:
        self.file = file
        self._tail: collections.deque[str] = collections.deque(maxlen=buffer_lines)
        self._secrets: tuple[str, ...] = ()
        self._content_line = content_line
        self._content_mode = content_mode
        self.lines_written = 0

    def set_secrets(self, *secrets: str) -> None:
        """Strings never to store (the current internal key)."""
        self._secrets = tuple(s for s in secrets if s)

    def clear_tail(self) -> None:
        self._tail.clear()

    def line(self, stream: str, pid: int, text: str) -> None:
        """Record one line the server printed."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = redact_text(text)
        if self._content_line is not None and self._content_mode != "keep":
            m = self._content_line.search(text)
            if m:
                if self._content_mode == "drop":
                    return
                text = text[: m.end()] + REDACTED
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE] + "…[truncated]"
        self._tail.append(text)
        self.lines_written += 1
        if self.file is not None:
            self.file.write({"ts": utc_timestamp(time.time()), "stream": stream, "pid": pid,
                             "line": text})

    def tail(self, n: int | None = None) -> list[str]:
        lines = list(self._tail)
        return lines if n is None else lines[-n:]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
