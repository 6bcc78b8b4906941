"""The event log's line contract: one JSON object per line, its leading keys, and `emit`
never raising, with a failed file write going to stderr and being counted."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from sovereignd.logs.eventlog import EventLog

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_each_event_is_one_json_line_led_by_ts_level_event(tmp_path: Path) -> None:
    stream = io.StringIO()
    log = EventLog(tmp_path, stream=stream)
    log.emit("server.spawn", pid=42, argv=["vllm", "serve"], model=tmp_path / "m")
    log.emit("gate.blocked", level="warning", reason="memory", ts="a caller's ts")
    log.close()
    lines = (tmp_path / "events.log").read_text().splitlines()
    assert lines == stream.getvalue().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert list(first) == ["ts", "level", "event", "pid", "argv", "model"]
    assert first["level"] == "info" and first["event"] == "server.spawn"
    assert first["model"] == str(tmp_path / "m")  # values JSON lacks become strings
    assert list(second) == ["ts", "level", "event", "reason"]
    assert second["level"] == "warning"
    assert TS.match(first["ts"]) and TS.match(second["ts"])  # the log's own time, in ms
    assert second["ts"] >= first["ts"]


def test_debug_events_are_not_written(tmp_path: Path) -> None:
    stream = io.StringIO()
    log = EventLog(None, stream=stream)
    log.emit("noise", level="debug", n=1)
    log.emit("kept", n=2)
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["kept"]


def test_listeners_get_the_event_as_written() -> None:
    seen: list[dict[str, Any]] = []
    stream = io.StringIO()
    log = EventLog(None, stream=stream, listeners=[seen.append])
    log.emit("state.change", frm="STARTING", to="READY")
    (written,) = (json.loads(line) for line in stream.getvalue().splitlines())
    assert seen == [written]


def test_an_unserialisable_event_is_counted_and_emit_does_not_raise() -> None:
    stream = io.StringIO()
    failures: list[int] = []
    log = EventLog(None, stream=stream)
    log.on_write_failure = lambda: failures.append(1)
    log.emit("odd", table={(1, 2): "tuple keys are not JSON"})
    log.emit("after", n=1)
    assert log.write_failures == 1 and failures == [1]
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["after"]


def test_a_full_disk_sends_the_event_to_stderr_and_counts_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """events.log on /dev/full (Linux): every write fails with ENOSPC, as on a full disk."""
    (tmp_path / "events.log").symlink_to("/dev/full")
    log = EventLog(tmp_path, stream=None)
    log.emit("server.exit", code=3)
    log.emit("server.spawn", pid=7)
    log.close()
    assert log.write_failures == 2
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["event"], e["level"]) for e in events] == [("server.exit", "info"),
                                                          ("server.spawn", "info")]
