"""Reading the request log: its files by name, its records in order, the retention ledger.

The format is the writer's (`requestlog`, whose docstring gives the record schema); this
module only reads, for verify, tail, the audit and the tests. Reading does not verify (use
`verify.verify_logs` for that).
"""

from __future__ import annotations

import datetime as dt
import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import orjson

from sovereignd.logs.files import utc_timestamp

LIVE_NAME = "requests.log"
LEDGER_NAME = "requests.retention"

_ROTATED = re.compile(r"^requests-(\d{8}T\d{6}Z)-(\d{12})-(\d{12})\.log(\.gz)?$")
_SEQ_DIGITS = 12


@dataclass(frozen=True)
class Segment:
    """One rotated file of the request log, as its name describes it."""

    path: Path
    start: float
    first: int
    last: int

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def compressed(self) -> bool:
        return self.path.name.endswith(".gz")


def rotated_name(start: float, first: int, last: int) -> str:
    """`requests-20261122T021100Z-000000000001-000000000512.log`: sorts by time and sequence."""
    stamp = dt.datetime.fromtimestamp(start, tz=dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"requests-{stamp}-{first:0{_SEQ_DIGITS}d}-{last:0{_SEQ_DIGITS}d}.log"


def parse_rotated_name(path: Path) -> Segment | None:
    m = _ROTATED.match(path.name)
    if not m:
        return None
    start = dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    return Segment(path, start.timestamp(), int(m.group(2)), int(m.group(3)))


def size_of(path: Path) -> int:
    """A file's size in bytes; 0 if it is gone (retention or compression removed it)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def list_segments(logs_dir: Path) -> list[Segment]:
    """Rotated files, oldest first; where a plain file and its .gz both exist, the plain one.

    Both exist only between the .gz's rename and the plain file's removal; both are complete.
    """
    by_range: dict[tuple[int, int], Segment] = {}
    try:
        entries = list(logs_dir.iterdir())
    except FileNotFoundError:
        return []
    for p in entries:
        seg = parse_rotated_name(p)
        if seg is None:
            continue
        key = (seg.first, seg.last)
        if key not in by_range or not seg.compressed:
            by_range[key] = seg
    return sorted(by_range.values(), key=lambda s: (s.first, s.last))


def open_lines(path: Path) -> IO[bytes]:
    """A binary reader of a log file, decompressing `.gz`; iterate it for lines."""
    if path.name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return path.open("rb")


def read_ledger(logs_dir: Path) -> list[dict[str, Any]]:
    """Entries of the retention ledger, in the order they were appended.

    Raises ValueError naming the line if one is not valid JSON.
    """
    entries: list[dict[str, Any]] = []
    try:
        with (logs_dir / LEDGER_NAME).open("rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"{LEDGER_NAME} line {n} is not valid JSON") from exc
                if not isinstance(entry, dict):
                    raise ValueError(f"{LEDGER_NAME} line {n} is not an object")
                entries.append(entry)
    except FileNotFoundError:
        pass
    return entries


def first_line(path: Path) -> bytes:
    """The first line of a log file (its opening marker), without the newline."""
    with open_lines(path) as f:
        return f.readline().rstrip(b"\n")


def last_marker_line(data: bytes) -> bytes | None:
    """The last marker line (the last line with a "key_id") in a file's bytes, or None."""
    # Markers carry "key_id"; a request's string values cannot contain the bare key
    # (JSON escapes their quotes), so the last occurrence is in the last marker.
    at = data.rfind(b'"key_id":')
    if at < 0:
        return None
    start = data.rfind(b"\n", 0, at) + 1
    end = data.find(b"\n", at)
    return data[start:end if end >= 0 else len(data)]


def iter_records(logs_dir: Path, since: float | None = None, until: float | None = None,
                 kinds: tuple[str, ...] | None = ("request",)) -> Iterator[dict[str, Any]]:
    """Records in sequence order across rotated and live files, optionally within [since, until).

    `since`/`until` are POSIX seconds compared with each record's `ts`; files whose time range
    lies wholly outside are not opened. `kinds=None` yields markers too. This reads; it does not
    verify (use `verify.verify_logs` for that). A torn last line is skipped.
    """
    files: list[tuple[Path, float]] = [(s.path, s.start) for s in list_segments(logs_dir)]
    live = logs_dir / LIVE_NAME
    if live.exists():
        files.append((live, files[-1][1] if files else 0.0))
    lo = _iso(since) if since is not None else None
    hi = _iso(until) if until is not None else None
    for i, (path, start) in enumerate(files):
        end = files[i + 1][1] if i + 1 < len(files) else None
        if until is not None and start >= until:
            break
        if since is not None and end is not None and end < since:
            continue
        try:
            f = open_lines(path)
        except FileNotFoundError:
            continue  # compressed or removed since the listing
        with f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(rec, dict):
                    continue
                if kinds is not None and rec.get("kind") not in kinds:
                    continue
                ts = rec.get("ts")
                if isinstance(ts, str):
                    if lo is not None and ts < lo:
                        continue
                    if hi is not None and ts >= hi:
                        continue
                yield rec


def _iso(seconds: float) -> str:
    # Lexical comparison of these fixed-width timestamps orders them in time.
    return utc_timestamp(seconds)
