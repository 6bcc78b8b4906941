"""Library logging as JSON events: every line the daemon writes on stdout/stderr is one.

watchdog, aiohttp, asyncio (and uvloop) report through the standard `logging` module, and
Python warnings through `warnings.showwarning`; without a handler, `logging` writes their
records as plain text to stderr (its "last resort" handler, Python docs `logging` "What
happens if no configuration is provided"). `route_library_logs` puts one handler on the root
logger that turns each record into a `library_log` event, and routes warnings through
`logging` (`logging.captureWarnings`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sovereignd.logs.eventlog import Emit

_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
           logging.ERROR: "error", logging.CRITICAL: "critical"}
MAX_MESSAGE = 500  # characters of a library's message kept in the event


class _ToEvents(logging.Handler):
    """A `logging.Handler` that hands each record to the event log."""

    def __init__(self, emit: Emit, level: int) -> None:
        super().__init__(level)
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a library's bad format string must not raise here
            message = str(record.msg)
        fields: dict[str, object] = {"logger": record.name, "message": message[:MAX_MESSAGE]}
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields["error"] = f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE]
        level = _LEVELS.get(record.levelno, "warning" if record.levelno < 40 else "error")
        self._emit("library_log", level=level, **fields)


def route_library_logs(emit: Emit, level: int = logging.WARNING) -> Callable[[], None]:
    """Send records of every library logger at `level` or above to `emit` as `library_log`
    events, and Python warnings with them; return the function that undoes it."""
    root = logging.getLogger()
    handler = _ToEvents(emit, level)
    saved_handlers, saved_level = root.handlers[:], root.level
    for old in saved_handlers:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)

    def undo() -> None:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        for old in saved_handlers:
            root.addHandler(old)
        root.setLevel(saved_level)

    return undo
