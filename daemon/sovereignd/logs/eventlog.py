"""Structured events of the daemon (state changes, spawns, exits, incidents), one JSON per line.

Events go to `events.log` in `logs.dir` (rotated) and to stderr, which launchd's
StandardErrorPath or journald keeps. Values go in keys, never into the message.

Logging cannot stop supervision: an event that cannot be written to the file (ENOSPC, EIO)
still goes to stderr, is counted (`write_failures`, `sovereignd_event_log_failures`), and
`emit` never raises.

The line is made by structlog's processor chain: `add_log_level`, the timestamp, the
listeners, then `JSONRenderer` with orjson. `ts`, `level` and `event` lead every line (for
`tail`) because they are the logger's initial context: structlog starts each event dict from
the context, and a processor that sets one of them replaces its value in place.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, Protocol, TextIO

import orjson
import structlog

from sovereignd.logs.files import RotatingFile, utc_timestamp

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class _Sink:
    """The logger structlog writes rendered lines to: the rotating file and a stream."""

    def __init__(self, file: RotatingFile | None, stream: TextIO | None,
                 failed: Callable[[], None]) -> None:
        self.file = file
        self.stream = stream
        self._failed = failed

    def msg(self, line: bytes) -> None:
        stream = self.stream
        if self.file is not None:
            try:
                self.file.write_line(line)
            except OSError:
                self._failed()
                stream = stream or sys.stderr  # the event must land somewhere
        if stream is not None:
            try:
                stream.write(line.decode() + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed (launchd path gone): the file still has the event

    debug = info = warning = error = critical = exception = msg


# The keys every line starts with, in this order.
LEADING = ("ts", "level", "event")


def _add_time(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    # Not structlog's TimeStamper: its formats give microseconds (isoformat, strftime %f), and
    # `ts` is the millisecond form of the request records, compared as text by the audit.
    event["ts"] = utc_timestamp(time.time())
    return event


class EventLog:
    """The daemon's event log; `emit` is the one way to record an event."""

    def __init__(self, logs_dir: Path | None, max_bytes: int = 64 * 2**20, keep: int = 10,
                 stream: TextIO | None = sys.stderr,
                 listeners: list[Callable[[dict[str, Any]], None]] | None = None) -> None:
        self.file = (RotatingFile(logs_dir / "events.log", max_bytes, keep)
                     if logs_dir is not None else None)
        self._listeners = listeners if listeners is not None else []
        self.write_failures = 0
        self.on_write_failure: Callable[[], None] | None = None
        self._log = structlog.wrap_logger(
            _Sink(self.file, stream, self._write_failed),
            processors=[structlog.processors.add_log_level, _add_time, self._notify,
                        # default=str: values JSON lacks (Path, enum) become strings.
                        structlog.processors.JSONRenderer(serializer=orjson.dumps, default=str)],
            wrapper_class=structlog.make_filtering_bound_logger(LEVELS["info"]),
            cache_logger_on_first_use=False,
            **dict.fromkeys(LEADING),
        )

    def _notify(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
        for listener in self._listeners:
            listener(dict(event))
        return event

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self._listeners.append(listener)

    def _write_failed(self) -> None:
        self.write_failures += 1
        if self.on_write_failure is not None:
            self.on_write_failure()

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        """Record one event; never raises (a failing write is counted, see the module)."""
        try:
            getattr(self._log, level)(event, **fields)
        except (OSError, TypeError, ValueError):  # unserializable value, closed stream
            self._write_failed()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Emit(Protocol):
    """The shape of `EventLog.emit`, for components that log events without owning the log."""

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None: ...


def discard(event: str, level: str = "info", **fields: Any) -> None:
    """An `Emit` that drops events: for tools and tests that have no event log."""
