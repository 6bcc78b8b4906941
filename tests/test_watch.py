"""The integrity/environment watch: only changes reach it, and a lost-events overflow ends in
one re-verification, never a loop."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any, cast

from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD

from sovereignd.config import Config
from sovereignd.integrity import monitor
from sovereignd.logs.eventlog import EventLog
from sovereignd.logs.libraries import route_library_logs
from sovereignd.supervision.supervisor import Supervisor


class _Sup:
    """The little of a supervisor a guard touches."""

    def __init__(self) -> None:
        self.checks: dict[str, Any] = {}
        self.state = None

    def request(self, *_a: Any, **_k: Any) -> None:
        raise AssertionError("no drift expected")

    def set_degraded(self, *_a: Any) -> None:
        pass


class CountingGuard(monitor.Guard):
    """A guard over one folder whose verification only records what it was asked."""

    name = "probe"

    def __init__(self, folder: Path, events: EventLog) -> None:
        super().__init__(cast(Config, None), cast(Supervisor, _Sup()), events)
        self.folder = folder
        self.calls: list[list[str] | None] = []

    @property
    def policy(self) -> str:
        return "alert"

    @property
    def interval(self) -> float:
        return 0.0

    stat_interval = 3600.0

    def watched(self) -> list[Path]:
        return [self.folder]

    def load(self) -> None:
        pass

    def verify(self, paths: list[str] | None, low_priority: bool) -> dict[str, dict[str, Any]]:
        self.calls.append(paths)
        return {}


def _tree(root: Path, folders: int = 20, files: int = 10) -> list[Path]:
    out = []
    for i in range(folders):
        d = root / f"pkg{i}"
        d.mkdir(parents=True)
        for j in range(files):
            f = d / f"mod{j}.py"
            f.write_text(f"x = {j}\n")
            out.append(f)
    return out


def test_reads_reach_no_one_and_a_write_is_seen(tmp_path: Path) -> None:
    """Opening, reading and listing every file raises no event; writing one does."""
    files = _tree(tmp_path / "venv")
    events = EventLog(None, stream=io.StringIO())

    async def scenario() -> None:
        guard = CountingGuard(tmp_path / "venv", events)
        assert await guard.gate() is None
        guard.start()
        try:
            emitters = list(guard._observer.emitters)
            mask = emitters[0].get_event_mask_from_filter()
            for read_bit in (InotifyConstants.IN_OPEN, InotifyConstants.IN_ACCESS,
                             InotifyConstants.IN_CLOSE_NOWRITE):
                assert not mask & read_bit
            for _ in range(3):
                for f in files:
                    f.read_bytes()
                for d in (tmp_path / "venv").iterdir():
                    list(d.iterdir())
            await asyncio.sleep(0.5)
            assert guard.calls == [None]  # only the first full verification
            files[7].write_text("changed = True\n")
            for _ in range(100):
                if len(guard.calls) > 1:
                    break
                await asyncio.sleep(0.05)
            assert guard.calls[1] is not None and str(files[7]) in guard.calls[1]
        finally:
            await guard.stop()

    asyncio.run(scenario())


def test_an_overflow_burst_ends_in_one_full_reverification(tmp_path: Path) -> None:
    """watchdog's own overflow path (the kernel's IN_Q_OVERFLOW event handed to the shared
    inotify reader) leads to exactly one full re-verification and one event, however many
    overflows arrive; its warnings come out as JSON events, not plain text."""
    _tree(tmp_path / "venv", folders=5, files=3)
    stream = io.StringIO()
    events = EventLog(None, stream=stream)
    undo = route_library_logs(events.emit)
    overflow = InotifyEvent(-1, InotifyConstants.IN_Q_OVERFLOW, 0, b"")

    async def scenario() -> None:
        guard = CountingGuard(tmp_path / "venv", events)
        await guard.gate()
        guard.start()
        try:
            for _ in range(5):
                await asyncio.to_thread(InotifyFD.get_instance().handle_event, overflow)
            for _ in range(100):
                if len(guard.calls) > 1:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(monitor.OVERFLOW_SETTLE + 0.5)
            assert guard.calls == [None, None]
            assert guard.overflows == 5
        finally:
            await guard.stop()

    try:
        asyncio.run(scenario())
    finally:
        undo()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["event"] for e in lines].count("probe_watch_overflow") == 1
    library = [e for e in lines if e["event"] == "library_log"]
    assert library and all(e["logger"].startswith("watchdog") for e in library)
    assert any("overflowed" in e["message"] for e in library)


def test_library_warnings_and_records_become_json_events() -> None:
    """A library's logging record and a Python warning each come out as one JSON event."""
    stream = io.StringIO()
    events = EventLog(None, stream=stream)
    undo = route_library_logs(events.emit)
    try:
        logging.getLogger("aiohttp.server").error("Error handling request %s", "x")
        logging.getLogger("asyncio").info("below the threshold: dropped")
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # pytest turns warnings into errors
            warnings.warn_explicit("old api", DeprecationWarning, "lib.py", 3)
    finally:
        undo()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["logger"], e["level"]) for e in lines] == [("aiohttp.server", "error"),
                                                           ("py.warnings", "warning")]
    assert lines[0]["message"] == "Error handling request x"
    assert "old api" in lines[1]["message"]
