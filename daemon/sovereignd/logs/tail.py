"""`sovereignd logs tail`: the daemon's JSON logs rendered for a person, following rotation.

Each line becomes aligned columns (time, level or status, event or client, then the rest as
key=value), coloured on a terminal and plain when piped or when NO_COLOR is set. `-f` follows
the live file by inode: when the name points to a new file, the old open file is read to its
end first, then any file rotated in between, then the new one, so no line is lost or shown
twice. The request log is followed by sequence number as well, because its rotated files are
compressed into new files (new inodes) behind the reader's back.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import orjson

from sovereignd.errors import SovereigndError
from sovereignd.logs.files import rotated_files
from sovereignd.logs.records import LIVE_NAME, list_segments, open_lines
from sovereignd.textsafe import escape, escape_all

SOURCES = ("events", "server", "requests")
POLL_INTERVAL = 0.2
_BACK_BLOCK = 64 * 1024
_BARE = re.compile(r"^[^\s\"=]+$")


class TailError(SovereigndError):
    """The logs cannot be tailed as asked."""


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Style:
    """ANSI colours when writing to a terminal, nothing otherwise."""

    color: bool

    def __call__(self, text: str, code: str) -> str:
        if not self.color or not code or not text:
            return text
        return f"\x1b[{code}m{text}\x1b[0m"


def use_color(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (no-color.org) or TERM=dumb."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_LEVEL_COLOR = {"debug": "2", "info": "32", "warning": "33", "error": "31",
                "critical": "1;31"}


def _time(ts: Any) -> str:
    # 2026-11-22T02:11:00.123Z -> 2026-11-22 02:11:00.123 (UTC, as the logs are)
    text = str(ts or "")
    return (text[:10] + " " + text[11:23]) if len(text) >= 23 else text.ljust(23)


def _value(v: Any) -> str:
    if isinstance(v, str):
        # Records arrive here escaped (textsafe): quoting must not escape their escapes again.
        return v if _BARE.match(v) else '"' + v.replace('"', '\\"') + '"'
    return orjson.dumps(v, default=str).decode()


def _pairs(rec: dict[str, Any], skip: Iterable[str], style: Style) -> str:
    skipped = set(skip)
    return " ".join(f"{style(k + '=', '2')}{_value(v)}" for k, v in rec.items()
                    if k not in skipped)


def format_event(rec: dict[str, Any], style: Style) -> str:
    """`2026-11-22 02:11:00.123  warning  state   from=READY to=BACKOFF reason=...`"""
    level = str(rec.get("level", ""))
    return "  ".join([
        style(_time(rec.get("ts")), "2"),
        style(f"{level:<8}", _LEVEL_COLOR.get(level, "")),
        style(f"{rec.get('event', '')!s:<20}", "1;36"),
        _pairs(rec, ("ts", "level", "event"), style)]).rstrip()


def format_server(rec: dict[str, Any], style: Style) -> str:
    """`2026-11-22 02:11:00.123  stderr  4242     the server's own line`"""
    stream = str(rec.get("stream", ""))
    extra = _pairs(rec, ("ts", "stream", "pid", "line"), style)
    return "  ".join([
        style(_time(rec.get("ts")), "2"),
        style(f"{stream:<6}", "33" if stream == "stderr" else ""),
        f"{rec.get('pid', '')!s:<7}",
        str(rec.get("line", "")) + (f"  {extra}" if extra else "")]).rstrip()


def _status_color(status: Any) -> str:
    if not isinstance(status, int):
        return ""
    return "32" if status < 300 else "36" if status < 400 else "33" if status < 500 else "31"


_REQUEST_SHOWN = ("ts", "seq", "kind", "client", "method", "path", "status", "model",
                  "latency_ms", "prompt_tokens", "completion_tokens", "stream", "error",
                  "prev", "epoch", "seal")


def format_request(rec: dict[str, Any], style: Style) -> str:
    """`2026-11-22 02:11:00.123  200  alice  POST /v1/chat/completions  model=m 12.3ms ...`"""
    kind = rec.get("kind")
    ts = style(_time(rec.get("ts")), "2")
    seq = f"{style('seq=', '2')}{rec.get('seq')}"
    if kind in ("start", "incomplete"):
        # A request accepted for the server, or one whose end was never recorded (crash).
        label = style("START", "2") if kind == "start" else style("INCOMPLETE", "31")
        rest = _pairs(rec, ("ts", "seq", "kind", "client", "method", "path", "model", "prev",
                            "epoch", "seal"), style)
        return "  ".join([ts, label, str(rec.get("client") or "-"),
                          f"{rec.get('method', '')} {rec.get('path', '')}",
                          f"{style('model=', '2')}{_value(rec.get('model'))}", seq, rest]).rstrip()
    if kind != "request":
        rest = _pairs(rec, ("ts", "seq", "kind", "prev", "epoch", "seal"), style)
        return "  ".join([ts, "---", style(f"[{kind}]", "35"), f"{seq} {rest}".rstrip()])
    status = rec.get("status")
    tokens = ""
    if rec.get("prompt_tokens") is not None or rec.get("completion_tokens") is not None:
        tokens = (f"{style('tokens=', '2')}{rec.get('prompt_tokens') or 0}+"
                  f"{rec.get('completion_tokens') or 0}")
    latency = rec.get("latency_ms")
    parts = [f"{rec.get('method', '')} {rec.get('path', '')}",
             f"{style('model=', '2')}{_value(rec.get('model'))}" if rec.get("model") else "",
             f"{latency:.1f}ms" if isinstance(latency, int | float) else "",
             tokens, "stream" if rec.get("stream") else "",
             style(f"error={rec['error']}", "31") if rec.get("error") else "", seq,
             _pairs({k: v for k, v in rec.items() if v is not None}, _REQUEST_SHOWN, style)]
    return "  ".join([
        ts, style(f"{status!s:<3}", _status_color(status)),
        style(f"{rec.get('client') or '-'!s:<12}", "1"),
        " ".join(p for p in parts if p)]).rstrip()


FORMATTERS: dict[str, Callable[[dict[str, Any], Style], str]] = {
    "events": format_event, "server": format_server, "requests": format_request}


# ---------------------------------------------------------------------------------------------
# Sources: which files hold a log, oldest first


@dataclass(frozen=True)
class Source:
    """One log: its live file and how its rotated files are found."""

    name: str
    live: Path

    @classmethod
    def of(cls, name: str, logs_dir: Path, server_log: str = "server.log") -> Source:
        """`server_log`: the model's own file with several models (`server.NAME.log`)."""
        file = {"events": "events.log", "server": server_log, "requests": LIVE_NAME}[name]
        return cls(name, logs_dir / file)

    def rotated(self) -> list[Path]:
        """Rotated files, oldest first (the live file excluded)."""
        if self.name == "requests":
            return [s.path for s in list_segments(self.live.parent)]
        return [p for p in rotated_files(self.live) if p != self.live]


def _open_any(path: Path) -> IO[bytes]:
    """Open a rotated file; a plain request-log file may have become `.gz` meanwhile."""
    try:
        return open_lines(path)
    except FileNotFoundError:
        gz = path.with_name(path.name + ".gz")
        if path.name.endswith(".log") and gz.exists():
            return open_lines(gz)
        raise


def _whole_lines(path: Path) -> list[bytes]:
    try:
        with _open_any(path) as f:
            data = f.read()
    except FileNotFoundError:
        return []  # removed by retention while we looked
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def _last_lines_of(f: IO[bytes], end: int, n: int, keep: Callable[[bytes], bool]) -> list[bytes]:
    """The last `n` kept complete lines of an open plain file before offset `end`, read
    backwards in blocks so a large file costs only what is shown."""
    found: collections.deque[bytes] = collections.deque()
    pos, rest = end, b""
    while pos > 0 and len(found) < n:
        step = min(_BACK_BLOCK, pos)
        pos -= step
        f.seek(pos)
        chunk = f.read(step) + rest
        lines = chunk.split(b"\n")
        rest = lines.pop(0) if pos > 0 else b""
        for line in reversed(lines):
            if line and keep(line) and len(found) < n:
                found.appendleft(line)
    return list(found)


def _complete_end(f: IO[bytes], size: int) -> int:
    """The offset just after the last newline before `size`: a line being written has no
    newline yet, so following starts at its beginning rather than in its middle."""
    pos = size
    while pos > 0:
        step = min(_BACK_BLOCK, pos)
        f.seek(pos - step)
        at = f.read(step).rfind(b"\n")
        if at >= 0:
            return pos - step + at + 1
        pos -= step
    return 0


# ---------------------------------------------------------------------------------------------
# Tailing


@dataclass
class _Live:
    """The live file as the follower holds it open."""

    f: IO[bytes]
    ino: int
    buf: bytes = b""


@dataclass
class Tail:
    """Prints the last lines of one log and, with `follow`, everything written after them."""

    source: Source
    out: TextIO
    style: Style
    client: str | None = None
    poll_interval: float = POLL_INTERVAL
    notice: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr))
    _live: _Live | None = None
    _last_seq: int = 0
    _format: Callable[[dict[str, Any], Style], str] = format_event

    def __post_init__(self) -> None:
        self._format = FORMATTERS[self.source.name]

    # --- lines to text -------------------------------------------------------------------

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        return rec if isinstance(rec, dict) else None

    def _wanted(self, line: bytes) -> bool:
        if self.client is None:
            return True
        rec = self._parse(line)
        return rec is not None and rec.get("kind") == "request" and rec.get("client") == \
            self.client

    def _new(self, line: bytes) -> bool:
        """For the request log: True unless this record was shown already (by its seq)."""
        if self.source.name != "requests":
            return True
        rec = self._parse(line)
        seq = rec.get("seq") if rec is not None else None
        if not isinstance(seq, int):
            return True
        if seq <= self._last_seq:
            return False
        self._last_seq = seq
        return True

    def _emit(self, lines: Iterable[bytes]) -> None:
        written = False
        for line in lines:
            if not line.strip() or not self._new(line) or not self._wanted(line):
                continue
            rec = self._parse(line)
            # Client and server text is escaped before colours are added (textsafe).
            text = (self._format(escape_all(rec), self.style) if rec is not None
                    else escape(line.decode("utf-8", "replace")))
            self.out.write(text + "\n")
            written = True
        if written:
            self.out.flush()

    # --- the backlog ---------------------------------------------------------------------

    def _open_live(self) -> _Live | None:
        try:
            f = self.source.live.open("rb")
        except FileNotFoundError:
            return None
        return _Live(f, os.fstat(f.fileno()).st_ino)

    def backlog(self, n: int) -> None:
        """Show the last `n` (matching) lines; leave the live file open where they end."""
        self._live = self._open_live()
        picked: list[bytes] = []
        if self._live is not None:
            f = self._live.f
            end = _complete_end(f, os.fstat(f.fileno()).st_size)
            picked = _last_lines_of(f, end, n, self._wanted) if n else []
            f.seek(end)
        if len(picked) < n:
            older: list[bytes] = []
            live_ino = self._live.ino if self._live is not None else None
            for path in reversed(self.source.rotated()):
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_ino == live_ino:
                        continue  # rotated after we opened it: it is our live file
                kept = [ln for ln in _whole_lines(path) if ln.strip() and self._wanted(ln)]
                older = kept + older
                if len(older) + len(picked) >= n:
                    break
            picked = older[len(older) + len(picked) - n:] + picked if n else []
        self._emit(picked)
        if self.source.name == "requests":
            # Following continues after everything before the position, shown or filtered.
            if self._live is not None:
                self._last_seq = max(self._last_seq, self._seq_before_position())
            else:
                segments = list_segments(self.source.live.parent)
                self._last_seq = max([self._last_seq] + [s.last for s in segments[-1:]])

    def _seq_before_position(self) -> int:
        """The seq of the last complete record before the follower's position in the live file."""
        assert self._live is not None
        f = self._live.f
        pos = f.tell()
        last = _last_lines_of(f, pos, 1, lambda _line: True)
        f.seek(pos)
        rec = self._parse(last[0]) if last else None
        seq = rec.get("seq") if rec is not None else None
        return seq if isinstance(seq, int) else 0

    # --- following -----------------------------------------------------------------------

    def _read_available(self) -> list[bytes]:
        assert self._live is not None
        live = self._live
        data = live.f.read()
        if not data:
            return []
        data = live.buf + data
        *lines, live.buf = data.split(b"\n")
        return lines

    def poll(self) -> None:
        """Show what was written since the last poll, across a rotation if one happened."""
        if self._live is None:
            self._live = self._open_live()
            if self._live is None:
                return
            self._catch_up_before_live(previous_ino=None)
        self._emit(self._read_available())
        try:
            ino = self.source.live.stat().st_ino
        except FileNotFoundError:
            ino = None
        if ino == self._live.ino:
            return
        # Rotated: the writer closed the old file before renaming it, so its end is final.
        self._emit(self._read_available())
        old = self._live
        if old.buf:
            self._emit([old.buf])
        old.f.close()
        self._live = self._open_live()
        if self._live is not None:
            self._catch_up_before_live(previous_ino=old.ino)
            self._emit(self._read_available())
        else:
            self._catch_up_before_live(previous_ino=old.ino)

    def _catch_up_before_live(self, previous_ino: int | None) -> None:
        """Show rotated files that came after the one last followed and before the new live."""
        if self.source.name == "requests":
            self._catch_up_requests()
            return
        if previous_ino is None:
            return
        done: set[int] = {previous_ino}
        live_ino = self._live.ino if self._live is not None else None
        while True:
            files = []
            for path in self.source.rotated():
                with contextlib.suppress(FileNotFoundError):
                    files.append((path, path.stat().st_ino))
            positions = [i for i, (_, ino) in enumerate(files) if ino == previous_ino]
            if not positions:
                self.notice(f"sovereignd: {self.source.live.name} rotated more often than it "
                            "was read and older files were removed: some lines may be missing")
                return
            todo = [(p, ino) for p, ino in files[positions[0] + 1:]
                    if ino not in done and ino != live_ino]
            if not todo:
                return
            for path, ino in todo:
                done.add(ino)
                self._emit(_whole_lines(path))

    def _catch_up_requests(self) -> None:
        while True:
            todo = [s for s in list_segments(self.source.live.parent) if s.last > self._last_seq]
            if not todo:
                return
            for seg in todo:
                self._emit(_whole_lines(seg.path))
                # A segment must advance past its end even if its last lines were filtered.
                self._last_seq = max(self._last_seq, seg.last)

    def run(self, n: int, follow: bool, stop: threading.Event) -> None:
        """Show the backlog, then follow until `stop` is set (a signal handler sets it)."""
        self.backlog(n)
        if not follow:
            return
        while not stop.is_set():
            self.poll()
            stop.wait(self.poll_interval)
        self.poll()  # what was written up to the stop

    def close(self) -> None:
        if self._live is not None:
            self._live.f.close()
            self._live = None


def tail(logs_dir: Path, source: str, *, n: int = 10, follow: bool = False,
         client: str | None = None, out: TextIO | None = None, color: bool | None = None,
         stop: threading.Event | None = None, server_log: str = "server.log") -> None:
    """`sovereignd logs tail`: render the last `n` lines of a log and follow it if asked
    (`server_log`: which model's server output, with several models)."""
    if source not in SOURCES:
        raise TailError(f"unknown log {source!r}: choose one of {', '.join(SOURCES)}")
    if client is not None and source != "requests":
        raise TailError("--client filters request records: use it with --requests")
    if n < 0:
        raise TailError("-n must be 0 or more")
    if not logs_dir.is_dir():
        raise TailError(f"{logs_dir} does not exist: no logs yet (logs.dir in the "
                        "configuration; the daemon creates it at its first start)")
    stream = out if out is not None else sys.stdout
    style = Style(use_color(stream) if color is None else color)
    t = Tail(Source.of(source, logs_dir, server_log), stream, style, client=client)
    try:
        t.run(n, follow, stop or threading.Event())
    finally:
        t.close()


def iter_rendered(logs_dir: Path, source: str, color: bool = False) -> Iterator[str]:
    """Every line of a log, oldest first, rendered as `tail` shows it (for checks and tests)."""
    src = Source.of(source, logs_dir)
    fmt = FORMATTERS[source]
    style = Style(color)
    paths = [*src.rotated(), src.live] if src.live.exists() else src.rotated()
    for path in paths:
        for line in _whole_lines(path):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                yield line.decode("utf-8", "replace")
                continue
            yield fmt(rec, style) if isinstance(rec, dict) else line.decode("utf-8", "replace")
