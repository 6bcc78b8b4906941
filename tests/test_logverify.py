"""`logs verify`: each kind of tampering is named with its file and sequence number."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from sovereignd.logs import sealing, verify
from sovereignd.logs.eventlog import EventLog
from sovereignd.logs.records import LEDGER_NAME, LIVE_NAME, list_segments
from sovereignd.logs.requestlog import compress_file
from sovereignd.logs.verify import (
    DELETED,
    EDITED,
    INSERTED,
    MISSING_FILE,
    REORDERED,
    TRUNCATED,
    UNSEALED,
    WRONG_KEY,
    VerifyResult,
    verify_logs,
)
from tests.helpers import run_cli
from tests.reqlog_support import Site, write

ROTATE = 4096


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """A sealed log of 150 requests over several plain rotated files and epochs."""
    s = Site(tmp_path / "site")
    s.init_key()
    log = s.writer(rotate_bytes=ROTATE)
    write(log, 0, 150)
    log.close()
    assert len(list_segments(s.logs)) >= 5
    return s


# --- the attacker's tools -----------------------------------------------------------------------


def chain_files(site: Site) -> list[Path]:
    return [s.path for s in list_segments(site.logs)] + [site.live()]


def read(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def put(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def locate(site: Site, seq: int) -> tuple[Path, int]:
    for path in chain_files(site):
        for i, line in enumerate(read(path)):
            if orjson.loads(line)["seq"] == seq:
                return path, i
    raise AssertionError(f"no seq {seq}")


def edit(site: Site, seq: int, **changes: object) -> Path:
    """Change fields of one record in place, leaving its seal and the chain as they were."""
    path, i = locate(site, seq)
    lines = read(path)
    rec = orjson.loads(lines[i])
    rec.update(changes)
    lines[i] = orjson.dumps(rec)
    put(path, lines)
    return path


def rebuild(site: Site, start: int, key_for: Callable[[int], bytes | None],
            change: Callable[[list[dict[str, object]]], None]) -> None:
    """Change the record list, then renumber and re-chain from seq `start` as an intruder would.

    Records before `start` keep their bytes. `key_for(epoch)` is the key the intruder reseals
    with, or None to keep the old seals.
    """
    files = chain_files(site)
    per_file = [read(p) for p in files]
    originals = [line for lines in per_file for line in lines]
    flat = [orjson.loads(line) for line in originals]
    sizes = [len(lines) for lines in per_file]
    change(flat)
    sizes[-1] += len(flat) - sum(sizes)  # insertions and deletions happen in the live file
    prev = sealing.GENESIS_PREV
    out: list[bytes] = []
    for seq, rec in enumerate(flat, 1):
        if seq < start:
            line = originals[seq - 1]
        else:
            old_seal = rec.pop("seal")
            rec["seq"], rec["prev"] = seq, prev
            core = orjson.dumps(rec)
            key = key_for(int(str(rec["epoch"])))
            seal = sealing.seal_bytes(key, core) if key is not None else str(old_seal).encode()
            line = sealing.sealed_line(core, seal)
        out.append(line)
        prev = sealing.line_hash(line)
    at = 0
    for path, n in zip(files, sizes, strict=True):
        put(path, out[at:at + n])
        at += n


def current_key(site: Site) -> bytes:
    """What an intruder finds on the machine: the state file's key, of the latest epoch."""
    return bytes.fromhex(json.loads(sealing.state_path(site.state).read_text())["key"])


def broken(result: VerifyResult) -> tuple[str, str, int | None]:
    assert result.broken is not None, "tampering went unnoticed"
    return result.broken.kind, result.broken.file, result.broken.seq


def check(site: Site, key: bool = True) -> VerifyResult:
    return verify_logs(site.logs, site.key if key else None, site.state)


# --- intact logs ------------------------------------------------------------------------------


def test_an_intact_log_verifies_with_counts_and_says_when_seals_were_not_checked(
        site: Site) -> None:
    result = check(site)
    assert result.ok, result.broken
    assert (result.requests, result.first_seq, result.files) == (150, 1, len(chain_files(site)))
    assert result.last_seq == result.records
    assert result.seals_checked and result.epoch_changes == len(list_segments(site.logs))
    assert "request log: OK" in result.render()
    bare = check(site, key=False)
    assert bare.ok and not bare.seals_checked
    assert "seals NOT checked" in bare.render()


# --- each tamper kind -------------------------------------------------------------------------


def test_an_edited_field_is_named_with_and_without_the_key(site: Site) -> None:
    path = edit(site, 40, status=500)
    assert broken(check(site)) == (EDITED, path.name, 40)
    # Without the key the next record's link gives it away.
    assert broken(check(site, key=False)) == (EDITED, path.name, 40)


def test_a_deleted_record_is_named(site: Site) -> None:
    path, i = locate(site, 60)
    lines = read(path)
    del lines[i]
    put(path, lines)
    assert broken(check(site)) == (DELETED, path.name, 60)


def test_an_inserted_record_with_a_rebuilt_chain_fails_its_seal(site: Site) -> None:
    # The insertion goes after a request of the live file that follows another request (where
    # the markers fall depends on the records' size).
    live = [orjson.loads(line) for line in read(site.logs / LIVE_NAME)]
    at = next(int(r["seq"]) for before, r in itertools.pairwise(live)
              if before["kind"] == r["kind"] == "request")

    def insert(records: list[dict[str, object]]) -> None:
        forged = dict(records[at - 2], id="forged", client="mallory")
        forged["seal"] = "0" * 64
        records.insert(at - 1, forged)

    rebuild(site, at, lambda _epoch: None, insert)
    assert broken(check(site)) == (INSERTED, LIVE_NAME, at)
    # Without the key a fully rebuilt chain looks whole: that is what the seals are for.
    assert check(site, key=False).ok


def test_two_swapped_records_are_named_reordered(site: Site) -> None:
    path, i = locate(site, 75)
    lines = read(path)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    put(path, lines)
    assert broken(check(site)) == (REORDERED, path.name, 75)


def test_a_live_file_cut_mid_record_is_truncated(site: Site) -> None:
    live = site.live()
    last_seq = orjson.loads(read(live)[-1])["seq"]
    live.write_bytes(live.read_bytes()[:-25])
    assert broken(check(site, key=False)) == (TRUNCATED, LIVE_NAME, last_seq)


def test_a_rotated_file_cut_at_a_line_boundary_is_truncated(site: Site) -> None:
    seg = list_segments(site.logs)[2]
    put(seg.path, read(seg.path)[:-2])
    assert broken(check(site)) == (TRUNCATED, seg.name, seg.last - 1)


def test_a_cut_compressed_file_is_truncated(tmp_path: Path) -> None:
    s = Site(tmp_path / "gz")
    s.init_key()
    log = s.writer(rotate_bytes=ROTATE, compress=True)
    write(log, 0, 80)
    log.close()
    seg = list_segments(s.logs)[1]
    assert seg.compressed
    seg.path.write_bytes(seg.path.read_bytes()[:-100])
    kind, file, seq = broken(verify_logs(s.logs, s.key))
    assert (kind, file) == (TRUNCATED, seg.name)
    assert seq is not None and seg.first < seq <= seg.last


def test_a_removed_rotated_file_is_a_missing_file(site: Site) -> None:
    segments = list_segments(site.logs)
    segments[2].path.unlink()
    assert broken(check(site)) == (MISSING_FILE, segments[3].name, segments[2].first)


def test_an_old_record_rewritten_with_the_current_key_fails_its_old_epochs_seal(
        site: Site) -> None:
    stolen = current_key(site)
    path, _ = locate(site, 30)
    old_epoch = orjson.loads(read(path)[0])["epoch"]
    assert old_epoch < json.loads(sealing.state_path(site.state).read_text())["epoch"]

    def alter(records: list[dict[str, object]]) -> None:
        records[29]["client"] = "nobody"

    rebuild(site, 30, lambda _epoch: stolen, alter)
    assert broken(check(site)) == (EDITED, path.name, 30)
    assert check(site, key=False).ok


def test_a_wrong_key_is_named_as_such(site: Site) -> None:
    other = sealing.parse_key("ab" * 32)
    result = verify_logs(site.logs, other)
    assert broken(result)[0] == WRONG_KEY
    assert result.broken is not None and result.broken.seq == 1
    assert "key id" in result.broken.message


def test_records_written_after_the_key_state_was_lost_are_an_unsealed_segment(
        site: Site) -> None:
    sealing.state_path(site.state).unlink()
    log = site.writer()
    seqs = write(log, 150, 3)
    log.close()
    assert broken(check(site)) == (UNSEALED, LIVE_NAME, seqs[0] - 1)


def test_a_new_key_needs_the_new_verification_key(site: Site) -> None:
    old = site.key
    new = site.init_key(force=True)
    log = site.writer()
    write(log, 150, 3)
    log.close()
    opened = next(orjson.loads(line) for line in reversed(read(site.live()))
                  if b'"kind":"open"' in line)
    assert opened["rekey"]
    result = verify_logs(site.logs, old, site.state)
    assert broken(result) == (UNSEALED, LIVE_NAME, opened["seq"])
    both = verify_logs(site.logs, [old or b"", new], site.state)
    assert both.ok, both.broken
    assert both.rekeys == [opened["seq"]] and len(both.key_ids) == 2


def test_a_deleted_live_file_shows_against_the_key_state(site: Site) -> None:
    site.live().unlink()
    kind, file, _ = broken(check(site))
    assert (kind, file) == (TRUNCATED, LIVE_NAME)


def test_a_removed_retention_ledger_entry_is_a_missing_file(tmp_path: Path) -> None:
    s = Site(tmp_path / "kept")
    s.init_key()
    log = s.writer(rotate_bytes=ROTATE, keep_files=2)
    write(log, 0, 150)
    log.close()
    assert verify_logs(s.logs, s.key, s.state).ok
    ledger = s.logs / LEDGER_NAME
    lines = read(ledger)
    assert len(lines) >= 2
    put(ledger, lines[1:])
    first = orjson.loads(lines[1])["first"]
    assert broken(verify_logs(s.logs, s.key)) == (MISSING_FILE, LEDGER_NAME, 1)
    assert first > 1


def test_a_rotation_or_compression_during_verification_is_not_a_break(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A running daemon may compress or rotate between the verifier's listing and its reads."""
    listed = list_segments(site.logs)
    compress_file(listed[1].path)
    stale = iter([listed[:-1]])  # the first listing predates the newest rotation
    real = verify.list_segments
    monkeypatch.setattr(verify, "list_segments", lambda d: next(stale, None) or real(d))
    result = check(site)
    assert result.ok, result.broken
    assert result.files == len(listed) + 1


# --- event-log checkpoints ------------------------------------------------------------------


def with_checkpoint(tmp_path: Path, after: int) -> tuple[Site, int]:
    """A sealed log with a checkpoint in the event log, followed by `after` more requests."""
    s = Site(tmp_path / "cp")
    s.init_key()
    events = EventLog(s.logs, stream=None)
    log = s.writer(rotate_bytes=ROTATE)
    write(log, 0, 100)
    cp = log.checkpoint()
    events.emit("requests.checkpoint", **cp.fields())
    write(log, 100, after)
    log.close()
    events.close()
    return s, cp.seq


def test_a_chain_rebuilt_without_the_key_differs_from_the_event_log_checkpoint(
        tmp_path: Path) -> None:
    s, cp_seq = with_checkpoint(tmp_path, after=20)
    assert verify_logs(s.logs, None).checkpoints_checked == 1

    def alter(records: list[dict[str, object]]) -> None:
        records[50]["status"] = 404

    rebuild(s, 51, lambda _epoch: None, alter)
    kind, _, seq = broken(verify_logs(s.logs, None))
    assert (kind, seq) == (EDITED, cp_seq)
    assert verify_logs(s.logs, None, checkpoints=False).ok


def test_records_cut_at_a_line_boundary_show_against_the_last_checkpoint(
        tmp_path: Path) -> None:
    s, cp_seq = with_checkpoint(tmp_path, after=0)
    live = s.live()
    put(live, read(live)[:-3])  # the close marker and the last two records
    assert broken(verify_logs(s.logs, None)) == (TRUNCATED, LIVE_NAME, cp_seq - 1)


# --- the CLI --------------------------------------------------------------------------------


def config_for(site: Site) -> Path:
    cfg = site.root / "sovereignd.yaml"
    site.root.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f"server:\n  model: {site.root / 'model'}\nlogs:\n  dir: {site.logs}\n"
                   f"daemon:\n  state_dir: {site.state}\n")
    return cfg


def test_cli_verify_reports_ok_and_breaks_with_exit_status(site: Site) -> None:
    cfg = config_for(site)
    key_file = site.root / "auditor.key"
    key_file.write_text((site.key or b"").hex() + "\n")
    proc = run_cli("logs", "verify", "--config", str(cfg), "--key-file", str(key_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("request log: OK")
    path = edit(site, 90, path="/v1/other")
    proc = run_cli("logs", "verify", "--config", str(cfg), "--key-file", "-",
                   input=key_file.read_text())
    assert proc.returncode == 1
    assert f"BROKEN: edited at seq 90 in {path.name}" in proc.stdout
    proc = run_cli("logs", "verify", "--config", str(cfg), "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["break"] == {"kind": "edited", "file": path.name, "seq": 90,
                            "message": doc["break"]["message"]}
    assert doc["seals_checked"] is False


def test_cli_rejects_a_malformed_key_without_echoing_it(site: Site) -> None:
    cfg = config_for(site)
    secretish = "zz" + (site.key or b"").hex()[2:]
    proc = run_cli("logs", "verify", "--config", str(cfg), "--key", secretish)
    assert proc.returncode == 1
    assert "bad verification key" in proc.stderr
    assert secretish not in proc.stderr


def test_cli_init_key_refuses_to_replace_a_key_without_force(tmp_path: Path) -> None:
    s = Site(tmp_path / "fresh")
    cfg = config_for(s)
    proc = run_cli("logs", "init-key", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    key = sealing.parse_key(proc.stdout)
    assert "shown only once" in proc.stderr
    assert key.hex() not in proc.stderr
    state = json.loads(sealing.state_path(s.state).read_text())
    assert state["epoch"] == 0 and state["key_id"] == sealing.key_id(key)
    proc = run_cli("logs", "init-key", "--config", str(cfg))
    assert proc.returncode == 1
    assert "--force replaces it" in proc.stderr
    proc = run_cli("logs", "init-key", "--config", str(cfg), "--force")
    assert proc.returncode == 0
    assert sealing.parse_key(proc.stdout) != key
