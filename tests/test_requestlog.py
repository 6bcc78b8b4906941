"""The request-log writer: numbering, chaining, rotation, compression, retention, recovery."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import stat
from pathlib import Path

import orjson
import pytest

from sovereignd.logs import sealing
from sovereignd.logs.records import LEDGER_NAME, iter_records, list_segments, read_ledger
from sovereignd.logs.requestlog import REQUEST_FIELDS, RequestLog, RequestLogError, maintain
from sovereignd.logs.verify import TRUNCATED, UNSEALED, verify_logs
from tests.reqlog_support import Clock, Events, Site, request, write


def lines(path: Path) -> list[dict[str, object]]:
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    return [orjson.loads(line) for line in raw.splitlines()]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    s = Site(tmp_path / "site")
    s.init_key()
    return s


def test_20000_records_across_compressed_rotations_verify_with_exact_counts(site: Site) -> None:
    """Nothing is lost or duplicated across ~35 rotations with compression in a thread."""
    log = site.writer(rotate_bytes=256 * 1024, compress=True)
    seqs = write(log, 0, 20_000)
    log.close()
    assert seqs == sorted(set(seqs)) and len(seqs) == 20_000

    segments = list_segments(site.logs)
    assert len(segments) > 30
    assert all(s.compressed for s in segments)
    assert not list(site.logs.glob("requests-*.log")), "plain files left after compression"
    assert all(s.path.stat().st_size < 256 * 1024 for s in segments)

    result = verify_logs(site.logs, site.key, site.state)
    assert result.ok, result.broken
    assert result.requests == 20_000
    assert result.seals_checked
    assert result.epoch_changes == len(segments)
    everything = list(iter_records(site.logs, kinds=None))
    assert [r["seq"] for r in everything] == list(range(1, len(everything) + 1))
    ids = [r["id"] for r in everything if r["kind"] == "request"]
    assert ids == [f"req-{i:08d}" for i in range(20_000)]
    request_seqs = {r["seq"] for r in everything if r["kind"] == "request"}
    assert request_seqs == set(seqs)


def test_a_record_has_the_documented_fields_in_order(site: Site) -> None:
    log = site.writer()
    seq = log.record(request(1))
    log.close()
    rec = lines(site.live())[1]
    assert rec["seq"] == seq == 2  # seq 1 is the open marker
    assert list(rec) == ["ts", "seq", "kind", *REQUEST_FIELDS, "prev", "epoch", "seal"]
    assert rec["kind"] == "request" and rec["epoch"] == 0
    assert rec["ts"] == "2026-11-22T02:11:00.000Z"
    opened = lines(site.live())[0]
    assert opened["kind"] == "open" and opened["prev"] == "0" * 64


def test_missing_fields_are_null_and_unknown_ones_are_refused_without_using_a_number(
        site: Site) -> None:
    log = site.writer()
    with pytest.raises(ValueError, match="unknown request record field"):
        log.record({"id": "x", "prompt": "secret text"})
    seq = log.record({"id": "y"})
    log.close()
    assert seq == 2
    rec = lines(site.live())[1]
    assert rec["id"] == "y" and rec["status"] is None


@pytest.mark.parametrize("mode", ["none", "hash", "full"])
def test_request_bodies_are_recorded_as_configured(site: Site, mode: str) -> None:
    log = site.writer(record_bodies=mode)
    log.record(request(1, req_body=b'{"prompt":"hi"}', resp_body='{"text":"hello"}'))
    log.close()
    rec = lines(site.live())[1]
    body_keys = [k for k in rec if k.startswith(("req_", "resp_"))]
    if mode == "none":
        assert body_keys == []
    elif mode == "hash":
        assert body_keys == ["req_sha256", "resp_sha256"]
        assert rec["req_sha256"] == hashlib.sha256(b'{"prompt":"hi"}').hexdigest()
    else:
        assert (rec["req_body"], rec["resp_body"]) == ('{"prompt":"hi"}', '{"text":"hello"}')
    assert verify_logs(site.logs, site.key).ok


def test_a_restarted_writer_continues_the_sequence_and_the_chain(site: Site) -> None:
    log = site.writer(rotate_bytes=16 * 1024)
    write(log, 0, 100)
    first = log.close()
    log = site.writer(rotate_bytes=16 * 1024)
    seqs = write(log, 100, 100)
    log.close()
    assert seqs[0] == first.seq + 2  # after the close marker and the new open marker
    result = verify_logs(site.logs, site.key, site.state)
    assert result.ok, result.broken
    assert result.requests == 200
    assert result.restarts == 2 and result.unclean_restarts == []
    assert result.closed


def test_a_restart_after_a_kill_is_marked_unclean(site: Site) -> None:
    log = site.writer()
    write(log, 0, 10)
    log.sync()
    crashed = site.snapshot("crashed")
    log.close()
    log = crashed.writer()
    write(log, 10, 5)
    log.close()
    result = verify_logs(crashed.logs, crashed.key)
    assert result.ok, result.broken
    assert result.unclean_restarts == [12]


def test_a_torn_last_line_is_reported_then_recorded_and_set_aside_at_restart(site: Site) -> None:
    log = site.writer()
    write(log, 0, 10)
    log.sync()
    crashed = site.snapshot("crashed")
    log.close()
    live = crashed.live()
    data = live.read_bytes()
    torn = data[:-40]  # the last record loses its end, as after a power cut mid-write
    live.write_bytes(torn)

    before = verify_logs(crashed.logs, crashed.key)
    assert before.broken is not None
    assert (before.broken.kind, before.broken.file, before.broken.seq) == (
        TRUNCATED, "requests.log", 11)

    events = Events()
    log = crashed.writer(events=events)
    seq = log.record(request(99))
    log.close()
    [note] = events.named("requests.torn_line")
    assert note["after_seq"] == 10
    records = lines(crashed.live())
    opened = records[-3]
    assert opened["kind"] == "open" and opened["seq"] == 11 and opened["unclean"]
    fragment = torn[torn.rfind(b"\n") + 1:]
    assert opened["torn"] == {"bytes": len(fragment),
                              "sha256": hashlib.sha256(fragment).hexdigest(),
                              "saved": note["saved"]}
    assert (crashed.logs / note["saved"]).read_bytes() == fragment
    assert seq == 12
    after = verify_logs(crashed.logs, crashed.key)
    assert after.ok, after.broken
    assert after.torn_recoveries == [11]


def test_rotation_by_utc_day_with_an_injected_clock(site: Site) -> None:
    clock = Clock(1795391990.0)  # 2026-11-22T23:59:50Z
    log = site.writer(clock=clock)
    write(log, 0, 3)
    clock.t += 15  # 2026-11-23T00:00:05Z
    seq = log.record(request(3))
    write(log, 4, 2)
    clock.t += 86_400
    log.tick()  # no traffic: the file still rotates at midnight
    log.close()
    names = [s.name for s in list_segments(site.logs)]
    assert names == ["requests-20261122T235950Z-000000000001-000000000004.log",
                     "requests-20261123T000005Z-000000000005-000000000008.log"]
    assert seq == 6  # 5 is the epoch marker that starts the new file
    assert [r["ts"][:10] for r in lines(site.live())] == ["2026-11-24"] * 2
    assert verify_logs(site.logs, site.key).ok


def test_a_restart_on_a_new_day_rotates_before_writing(site: Site) -> None:
    clock = Clock()
    log = site.writer(clock=clock)
    write(log, 0, 3)
    log.close()
    clock.t += 86_400
    log = site.writer(clock=clock)
    log.close()
    assert len(list_segments(site.logs)) == 1
    assert [r["kind"] for r in lines(site.live())] == ["epoch", "open", "close"]
    assert verify_logs(site.logs, site.key).ok


def test_the_key_evolves_every_seal_interval_without_traffic_and_the_old_key_is_gone(
        site: Site) -> None:
    clock = Clock()
    log = site.writer(clock=clock, seal_interval=60)
    write(log, 0, 3)
    old_state = sealing.state_path(site.state).read_bytes()
    clock.t += 61
    log.tick()
    new_state = orjson.loads(sealing.state_path(site.state).read_bytes())
    assert new_state["epoch"] == 1
    assert orjson.loads(old_state)["key"] not in sealing.state_path(site.state).read_text()
    assert stat.S_IMODE(sealing.state_path(site.state).stat().st_mode) == 0o600
    write(log, 3, 3)
    log.close()
    marker = lines(site.live())[4]
    assert (marker["kind"], marker["epoch"], marker["next_epoch"], marker["reason"]) == (
        "epoch", 0, 1, "interval")
    assert verify_logs(site.logs, site.key, site.state).ok


def test_a_crash_between_epoch_marker_and_state_write_is_finished_at_start(site: Site) -> None:
    log = site.writer(rotate_bytes=4096)
    write(log, 0, 5)
    log.sync()
    stale_state = sealing.state_path(site.state).read_bytes()
    write(log, 5, 20)  # rotates: marker written, then the state moves on
    log.sync()
    crashed = site.snapshot("crashed")
    log.close()
    epoch_now = orjson.loads(sealing.state_path(crashed.state).read_bytes())["epoch"]
    # As if the state's replacement had not happened when the power went: one epoch behind.
    state = orjson.loads(stale_state)
    state["epoch"] = epoch_now - 1
    state["key"] = sealing.evolve_to(crashed.key or b"", 0, epoch_now - 1).hex()
    sealing.state_path(crashed.state).write_bytes(orjson.dumps(state))
    log = crashed.writer(rotate_bytes=4096)
    write(log, 25, 3)
    log.close()
    result = verify_logs(crashed.logs, crashed.key, crashed.state)
    assert result.ok, result.broken


def test_retention_by_count_keeps_the_newest_files_and_lists_the_removed(site: Site) -> None:
    log = site.writer(rotate_bytes=8 * 1024, keep_files=3, compress=True)
    write(log, 0, 400)
    log.close()
    segments = list_segments(site.logs)
    assert len(segments) == 3
    ledger = read_ledger(site.logs)
    assert ledger and ledger[0]["first"] == 1
    assert all(a["last"] + 1 == b["first"] for a, b in itertools.pairwise(ledger))
    assert ledger[-1]["last"] + 1 == segments[0].first
    assert {e["reason"] for e in ledger} == {"keep_files"}
    result = verify_logs(site.logs, site.key, site.state)
    assert result.ok, result.broken
    assert result.removed_files == len(ledger)
    assert result.first_seq == segments[0].first
    kinds = [r["kind"] for r in iter_records(site.logs, kinds=("retention",))]
    assert kinds  # the removals are also recorded, sealed, in the chain


def test_retention_by_age_uses_the_end_of_each_file(site: Site) -> None:
    clock = Clock()
    log = site.writer(clock=clock, max_age=3600)
    for minute in range(3):
        write(log, minute * 10, 10)
        log.rotate()
        clock.t += 60
    assert len(list_segments(site.logs)) == 3
    clock.t += 3500  # now 3680 s after the start
    write(log, 30, 10)
    log.rotate()
    log.close()
    # A file's end is the next one's start: the first two ended 3680 s and 3620 s ago, the
    # third 3560 s ago; the newest rotated file always stays.
    remaining = list_segments(site.logs)
    assert len(remaining) == 2
    assert [e["reason"] for e in read_ledger(site.logs)] == ["max_age", "max_age"]
    result = verify_logs(site.logs, site.key, site.state)
    assert result.ok, result.broken
    assert result.removed_files == 2


def test_retention_by_age_also_runs_without_traffic(site: Site) -> None:
    clock = Clock()
    log = site.writer(clock=clock, max_age=3600, compress=True)
    for _ in range(3):
        write(log, 0, 10)
        log.rotate()
    assert log.wait_idle(timeout=30)
    clock.t += 7200
    log.tick()
    assert len(list_segments(site.logs)) == 1  # the newest rotated file always stays
    log.close()
    assert verify_logs(site.logs, site.key, site.state).ok


def test_an_interrupted_compression_is_finished_at_start(site: Site) -> None:
    log = site.writer(rotate_bytes=4096, compress=False)
    write(log, 0, 30)
    log.close()
    plain = list_segments(site.logs)
    (site.logs / (plain[0].name + ".gz.tmp")).write_bytes(b"partial")
    log = site.writer(rotate_bytes=4096, compress=True)
    log.close()
    assert all(s.compressed for s in list_segments(site.logs))
    assert not list(site.logs.glob("*.tmp"))
    assert verify_logs(site.logs, site.key).ok


def test_without_a_key_records_are_written_unsealed_and_reported(tmp_path: Path) -> None:
    bare = Site(tmp_path / "bare")
    events = Events()
    log = bare.writer(events=events, rotate_bytes=4096)
    write(log, 0, 20)
    log.close()
    assert events.named("requests.unsealed")
    result = verify_logs(bare.logs, None)
    assert result.broken is not None
    assert (result.broken.kind, result.broken.seq) == (UNSEALED, 1)
    with pytest.raises(RequestLogError, match="logs init-key"):
        RequestLog(bare.logs, bare.state, require_seal=True).open()


def test_iter_records_selects_a_period(site: Site) -> None:
    clock = Clock()
    log = site.writer(clock=clock)
    for day in range(3):
        write(log, day * 10, 10)
        clock.t += 86_400
    log.close()
    since, until = clock.t - 2 * 86_400 - 100, clock.t - 86_400 - 100
    picked = list(iter_records(site.logs, since, until))
    assert [r["id"] for r in picked] == [f"req-{i:08d}" for i in range(10, 20)]


def test_maintain_syncs_evolves_and_checkpoints_until_stopped(site: Site) -> None:
    clock = Clock()
    log = site.writer(clock=clock, seal_interval=30)
    events = Events()

    async def scenario() -> None:
        stop = asyncio.Event()

        def emit(event: str, level: str = "info", **fields: object) -> None:
            events(event, level, **fields)
            stop.set()

        write(log, 0, 5)
        clock.t += 31
        await maintain(log, emit, stop, checkpoint_interval=0, tick_interval=0.001)

    asyncio.run(scenario())
    [checkpoint] = events.named("requests.checkpoint")
    final = log.close()
    assert checkpoint["seq"] == final.seq - 1 == 7  # open, 5 requests, epoch marker
    assert checkpoint["epoch"] == 1
    assert checkpoint["head"] == hashlib.sha256(
        site.live().read_bytes().splitlines()[-2]).hexdigest()


def test_a_log_whose_last_record_is_damaged_is_not_continued(site: Site) -> None:
    log = site.writer()
    write(log, 0, 3)
    log.close()
    live = site.live()
    live.write_bytes(live.read_bytes()[:-30] + b"garbage\n")
    with pytest.raises(RequestLogError, match="last record is not a valid request record"):
        site.writer()


def test_files_are_created_with_the_log_mode(site: Site) -> None:
    log = site.writer(rotate_bytes=2048, compress=True)
    write(log, 0, 20)
    log.close()
    for path in site.logs.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert not (site.logs / LEDGER_NAME).exists()  # no retention configured, no ledger
