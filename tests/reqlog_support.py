"""Shared pieces for the request-log tests: a hand-moved clock, writers, crash snapshots."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from sovereignd.logs import sealing
from sovereignd.logs.records import LIVE_NAME
from sovereignd.logs.requestlog import RequestLog

# 2026-11-22T02:11:00Z, a Sunday; far enough from midnight for tests that do not rotate by day.
T0 = 1795313460.0


class Clock:
    """A wall clock the test moves by hand, passed to the writer as `clock`."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        # Each reading moves on a little, as a real clock would between records.
        self.t += 0.0001
        return self.t


class Events:
    """Collects emitted events, standing in for EventLog.emit."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        self.events.append((event, level, fields))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [f for e, _, f in self.events if e == name]


class Site:
    """A logs folder and a state folder, with the auditor's key once `init_key` ran."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.state = root / "state"
        self.key: bytes | None = None

    def init_key(self, force: bool = False) -> bytes:
        self.key, _ = sealing.init_key(self.state, force=force)
        return self.key

    def writer(self, clock: Clock | None = None, events: Events | None = None,
               **options: Any) -> RequestLog:
        options.setdefault("compress", False)
        log = RequestLog(self.logs, self.state, clock=clock or Clock(),
                         emit=events if events is not None else Events(), **options)
        log.open()
        return log

    def live(self) -> Path:
        return self.logs / LIVE_NAME

    def snapshot(self, name: str) -> Site:
        """Copy both folders as they are now: what a power cut or SIGKILL would leave behind."""
        copy = Site(self.root.parent / name)
        shutil.copytree(self.logs, copy.logs)
        if self.state.exists():
            shutil.copytree(self.state, copy.state)
        copy.key = self.key
        return copy


def request(i: int, **extra: Any) -> dict[str, Any]:
    """The fields the gateway would pass for request number `i`."""
    fields: dict[str, Any] = {
        "id": f"req-{i:08d}", "client": "alice" if i % 3 else "bob", "method": "POST",
        "path": "/v1/chat/completions", "model": "my-model", "status": 200, "stream": i % 2 == 0,
        "latency_ms": 12.5 + i % 7, "ttfb_ms": 3.25, "ttft_ms": 4.0 if i % 2 == 0 else None,
        "prompt_tokens": 20 + i % 11, "completion_tokens": 7, "bytes_in": 321,
        "bytes_out": 1234, "remote": "127.0.0.1", "error": None}
    fields.update(extra)
    return fields


def write(log: RequestLog, start: int, count: int) -> list[int]:
    return [log.record(request(i)) for i in range(start, start + count)]


def crash(log: RequestLog) -> None:
    """Leave the writer as a SIGKILL would: no close marker, no in-flight entries closed.

    Only the process's descriptors and threads are released (the kernel would do that).
    """
    # Private parts on purpose: this is what the kernel does to a killed process.
    for pool in (log._pool, log._sync_pool):
        if pool is not None:
            pool.shutdown(wait=True)
    if log._fd is not None:
        os.close(log._fd)
        log._fd = None
