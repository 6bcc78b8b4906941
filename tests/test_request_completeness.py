"""Start entries, incomplete requests after a crash, durability per requests.sync, and the
accounting `logs verify` does with them."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sovereignd.logs import requestlog
from sovereignd.logs.records import iter_records
from sovereignd.logs.requestlog import RequestLog, RequestLogError, maintain
from sovereignd.logs.verify import verify_logs
from tests.reqlog_support import Clock, Events, Site, crash, request


@pytest.fixture
def site(tmp_path: Path) -> Site:
    s = Site(tmp_path / "site")
    s.init_key()
    return s


def started(log: RequestLog, i: int) -> int:
    return log.start(request(i))


def finished(log: RequestLog, i: int, start_seq: int) -> int:
    return log.record(request(i, start_seq=start_seq))


def test_starts_left_open_by_a_crash_are_closed_as_incomplete_at_the_next_open(
        site: Site) -> None:
    log = site.writer()
    a, b, c = (started(log, i) for i in range(3))
    finished(log, 1, b)
    crash(log)
    events = Events()
    again = site.writer(events=events)
    again.close()
    everything = list(iter_records(site.logs, kinds=None))
    opened = next(r for r in everything if r["kind"] == "open" and r["unclean"])
    incomplete = [r for r in everything if r["kind"] == "incomplete"]
    assert [r["start_seq"] for r in incomplete] == [a, c]
    assert [r["id"] for r in incomplete] == ["req-00000000", "req-00000002"]
    assert all(r["reason"] == "unclean_stop" and r["client"] and r["model"] == "my-model"
               for r in incomplete)
    # The stop came after the last line the killed run wrote: the record of request 1.
    last_of_run = max((r for r in everything if r["seq"] < opened["seq"]),
                      key=lambda r: r["seq"])
    assert all(r["stopped_after"] == last_of_run["ts"] for r in incomplete)
    assert all(r["seq"] > opened["seq"] for r in incomplete)
    assert events.named("requests.incomplete")[0]["count"] == 2
    assert opened["format"] == requestlog.FORMAT and opened["sync"] == "interval"

    result = verify_logs(site.logs, site.key, site.state)
    assert result.ok, result.broken
    assert (result.starts, result.completed, len(result.incomplete), result.open_starts) == \
        (3, 1, 2, 0)
    assert result.exposures == []
    assert "3 request(s) started: 1 completed, 2 incomplete (2 unclean_stop)" in result.render()


def test_a_start_open_across_a_rotation_is_still_found_after_a_crash(site: Site) -> None:
    """Recovery reads one file: the new file's first marker carries the open starts."""
    log = site.writer()
    a = started(log, 0)
    b = started(log, 1)
    log.rotate()
    finished(log, 1, b)
    crash(log)
    live = site.live().read_bytes().splitlines()
    assert b'"in_flight":[' in live[0] and b'"req-00000000"' in live[0]
    site.writer().close()
    incomplete = list(iter_records(site.logs, kinds=("incomplete",)))
    assert [(r["start_seq"], r["id"]) for r in incomplete] == [(a, "req-00000000")]
    assert verify_logs(site.logs, site.key, site.state).open_starts == 0


def test_a_clean_stop_with_requests_still_open_records_them_as_daemon_stop(site: Site) -> None:
    log = site.writer()
    s = started(log, 0)
    log.close()
    [rec] = iter_records(site.logs, kinds=("incomplete",))
    assert rec["start_seq"] == s and rec["reason"] == "daemon_stop"
    last = list(iter_records(site.logs, kinds=None))[-1]
    assert last["kind"] == "close"


def test_an_unclean_stop_of_a_run_that_recorded_after_answering_is_an_exposure(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logs of the old format (records after the answers) cannot prove completeness."""
    monkeypatch.setattr(requestlog, "FORMAT", 1)
    log = site.writer()
    log.record(request(0))
    crash(log)
    monkeypatch.setattr(requestlog, "FORMAT", 2)
    site.writer().close()
    result = verify_logs(site.logs, site.key, site.state)
    assert result.ok
    [exposure] = result.exposures
    assert exposure["cause"] == "records_after_answers"
    assert "RECORDS MAY BE MISSING" in result.render()


@pytest.mark.parametrize(("sync", "rebooted", "exposed"), [
    ("interval", True, True), ("never", True, True), ("always", True, False),
    ("interval", False, False)])
def test_a_host_that_went_down_is_an_exposure_unless_every_record_was_synced(
        site: Site, monkeypatch: pytest.MonkeyPatch, sync: str, rebooted: bool,
        exposed: bool) -> None:
    monkeypatch.setattr(requestlog, "_boot_time", lambda: 1_000_000)
    log = site.writer(sync=sync)
    finished(log, 0, started(log, 0))
    crash(log)
    if rebooted:
        monkeypatch.setattr(requestlog, "_boot_time", lambda: 1_000_900)
    site.writer().close()
    result = verify_logs(site.logs, site.key, site.state)
    assert [x["cause"] for x in result.exposures] == (["host_down_unsynced"] if exposed else [])


class FsyncSpy:
    """Wraps os.fsync: when each call began and ended (monotonic)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
        self.calls: list[tuple[float, float]] = []
        self.fail = fail
        self._real = os.fsync
        self._lock = threading.Lock()
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        begun = time.monotonic()
        if self.fail:
            raise OSError(errno.EIO, "Input/output error")
        self._real(fd)
        with self._lock:
            self.calls.append((begun, time.monotonic()))


def test_always_returns_only_after_an_fsync_that_began_after_the_record_group_committed(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    log = site.writer(sync="always")
    spy = FsyncSpy(monkeypatch)
    windows: list[tuple[float, float]] = []

    async def one(i: int) -> None:
        seq = finished(log, i, started(log, i))
        written = time.monotonic()
        await log.durable(seq)
        windows.append((written, time.monotonic()))

    async def scenario() -> None:
        await asyncio.gather(*(one(i) for i in range(50)))

    asyncio.run(scenario())
    log.close()
    assert len(windows) == 50
    for written, returned in windows:
        assert any(written <= b and e <= returned for b, e in spy.calls)
    # Concurrent requests share fsyncs: far fewer than one per record.
    assert len(spy.calls) < 25


def test_a_failed_fsync_is_reported_to_the_waiter(site: Site,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    log = site.writer(sync="always")
    seq = log.record(request(0))
    FsyncSpy(monkeypatch, fail=True)
    with pytest.raises(RequestLogError, match="cannot make request records durable"):
        asyncio.run(log.durable(seq))
    monkeypatch.undo()
    log.close()


@pytest.mark.parametrize("sync", ["interval", "never"])
def test_maintain_fsyncs_every_interval_only_in_interval_mode(
        site: Site, monkeypatch: pytest.MonkeyPatch, sync: str) -> None:
    log = site.writer(sync=sync, sync_interval=0.01)
    spy = FsyncSpy(monkeypatch)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(maintain(log, Events(), stop, checkpoint_interval=60))
        seq = log.record(request(0))
        await log.durable(seq)  # returns at once in both modes
        calls_at_return = len(spy.calls)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout=0.2)
        stop.set()
        await task
        assert calls_at_return == 0

    asyncio.run(scenario())
    assert (len(spy.calls) >= 1) == (sync == "interval")
    log.close()


def test_start_entries_hold_no_content(site: Site) -> None:
    log = site.writer(record_bodies="full")
    fields: dict[str, Any] = {**request(0), "req_body": "secret prompt", "resp_body": "x"}
    log.start(fields)
    log.close()
    [start] = iter_records(site.logs, kinds=("start",))
    assert set(start) == {"ts", "seq", "kind", "id", "client", "method", "path", "model",
                          "remote", "prev", "epoch", "seal"}
    assert b"secret prompt" not in site.live().read_bytes()


def test_requests_sync_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sync must be one of"):
        RequestLog(tmp_path, tmp_path, sync="sometimes", clock=Clock())
