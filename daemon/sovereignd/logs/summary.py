"""Repeated events summarised: one event per key per interval, with a count.

A flood (failed keys, refused connections, exhausted descriptors) must not turn the event log
into its own denial of service: the first occurrence for a key is written at once, later ones
within `interval` are counted and written as one summary when the interval ends (the way
syslog's "last message repeated N times" and journald's rate limiting keep a log readable).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

Emit = Callable[..., None]


class Summarised:
    """Write `event` for a key at once, then at most once per `interval` with `count`."""

    def __init__(self, emit: Emit, event: str, interval: float, *, level: str = "warning",
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        self.emit, self.event, self.interval, self.level = emit, event, interval, level
        self.clock = clock
        self.max_keys = max_keys
        # key -> (window end, count since the last write, fields of the last occurrence)
        self._open: dict[str, tuple[float, int, dict[str, Any]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.total = 0

    def note(self, key: str, **fields: Any) -> None:
        """One occurrence for `key` (e.g. the client address)."""
        self.total += 1
        now = self.clock()
        entry = self._open.get(key)
        if entry is None and len(self._open) >= self.max_keys:
            key = "*"  # too many sources: they share one key
            entry = self._open.get(key)
        if entry is None:
            self.emit(self.event, level=self.level, count=1, interval_s=0, **fields)
            self._open[key] = (now + self.interval, 0, fields)
            self._arm()
            return
        end, count, _ = entry
        self._open[key] = (end, count + 1, fields)

    def _arm(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.interval, self.flush)

    def flush(self, everything: bool = False) -> None:
        """Write the summaries whose interval ended (all of them with `everything`)."""
        self._timer = None
        now = self.clock()
        for key, (end, count, fields) in list(self._open.items()):
            if end > now and not everything:
                continue
            del self._open[key]
            if count:
                self.emit(self.event, level=self.level, count=count,
                          interval_s=self.interval, summary=True, **fields)
        if self._open:
            self._arm()
