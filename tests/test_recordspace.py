"""Request records cannot fill the disk unnoticed: a size cap by default, a gauge, an event."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sovereignd import config
from sovereignd.logs import recordspace
from sovereignd.logs.records import list_segments, read_ledger
from sovereignd.logs.verify import verify_logs
from tests.reqlog_support import Site, write


@pytest.fixture
def site(tmp_path: Path) -> Site:
    s = Site(tmp_path / "site")
    s.init_key()
    return s


def test_size_cap_removes_the_oldest_files_and_the_chain_still_verifies(site: Site) -> None:
    log = site.writer(rotate_bytes=8 * 1024, compress=False, max_total_bytes=40 * 1024)
    write(log, 0, 600)
    log.close()
    segments = list_segments(site.logs)
    kept = sum(s.path.stat().st_size for s in segments)
    assert kept <= 40 * 1024 + 9 * 1024  # the cap, give or take the newest file
    ledger = read_ledger(site.logs)
    assert ledger and {e["reason"] for e in ledger} == {"max_total_bytes"}
    result = verify_logs(site.logs, site.key, site.state)
    assert result.ok, result.broken
    assert result.removed_files == len(ledger)


def test_default_retention_caps_request_records(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    cfg = config.loads(f"server:\n  model: {tmp_path}/m\nlogs:\n  dir: {tmp_path}\n".encode(),
                       tmp_path / "c.yaml")
    assert cfg.requests.max_total_bytes == 8 * 2**30
    assert cfg.requests.warn_free_bytes == 2 * 2**30


def test_space_watch_sets_the_gauges_and_warns_once_then_clears(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "requests.log").write_bytes(b"x" * 5000)
    text = (f"server:\n  model: {tmp_path}/m\nlogs:\n  dir: {tmp_path}\n"
            "requests:\n  max_total_bytes: 4000\n  warn_free_bytes: 1\n")
    cfg = config.loads(text.encode(), tmp_path / "c.yaml")
    events: list[tuple[str, dict[str, object]]] = []
    gauges: list[tuple[int, int]] = []

    async def run() -> None:
        stop, measured, cleared = asyncio.Event(), asyncio.Event(), asyncio.Event()

        def on_gauges(used: int, free: int) -> None:
            gauges.append((used, free))
            if len(gauges) >= 3:
                measured.set()

        def on_event(name: str, **fields: object) -> None:
            events.append((name, fields))
            if name == "requests.space_ok":
                cleared.set()

        task = asyncio.create_task(recordspace.watch(cfg, on_event, on_gauges, stop,
                                                     interval=0.05))
        await measured.wait()
        (tmp_path / "requests.log").write_bytes(b"x" * 10)
        await cleared.wait()
        stop.set()
        await task

    asyncio.run(asyncio.wait_for(run(), 10))
    assert gauges[0][0] == 5000 and gauges[0][1] > 0
    names = [name for name, _ in events]
    assert names == ["requests.space_low", "requests.space_ok"]  # once, not every interval
    assert events[0][1]["used_bytes"] == 5000
