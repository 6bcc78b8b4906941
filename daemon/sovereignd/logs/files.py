"""JSON-lines files with size-based rotation and a bounded number of rotated files kept.

Each file has exactly one writer (the daemon); rotation renames `name.log` to `name.log.1`,
shifting older ones up and removing those beyond `keep`, like logrotate's numbered scheme.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import orjson


def utc_timestamp(seconds: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-22T02:11:00.123Z."""
    stamp = dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def dumps(record: dict[str, Any]) -> bytes:
    """One JSON object, no newline; values that JSON lacks (Path, enum) become strings."""
    return orjson.dumps(record, default=str)


class RotatingFile:
    """Append-only JSON-lines file that rotates when it would exceed `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int, keep: int, mode: int = 0o640) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.mode = mode
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               self.mode)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def write_line(self, line: bytes) -> None:
        """Append one line (a newline is added); rotate first if the file would grow too big."""
        data = line + b"\n"
        fd = self._open()
        if self._size and self._size + len(data) > self.max_bytes:
            self.rotate()
            fd = self._open()
        os.write(fd, data)
        self._size += len(data)

    def write(self, record: dict[str, Any]) -> None:
        self.write_line(dumps(record))

    def rotate(self) -> None:
        """Close the current file and shift `name.N` to `name.N+1`, dropping those past `keep`."""
        self.close()
        for n in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if not older.exists():
                continue
            if n == self.keep:
                older.unlink()
            else:
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.path.exists():
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._size = 0


def rotated_files(path: Path) -> list[Path]:
    """The live file and its numbered rotations, oldest first."""
    numbered = []
    for p in path.parent.glob(f"{path.name}.*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit():
            numbered.append((int(suffix), p))
    files = [p for _, p in sorted(numbered, reverse=True)]
    if path.exists():
        files.append(path)
    return files
