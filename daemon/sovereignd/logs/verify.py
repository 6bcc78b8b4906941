"""Verify the request records: completeness, order, the hash chain and the forward-secure seals.

`verify_logs` reads the retention ledger and every request-log file in sequence order (plain
and .gz) and reports either OK with counts, or the FIRST break with its file, sequence number
and kind. Without the auditor's key it checks continuity and the chain only and says so: a
chain alone can be rewritten whole by whoever can write the files; the seals cannot, for any
epoch before the one whose key an intruder found.

It also accounts for every request the gateway accepted: each "start" entry must be closed by
its request record or by an "incomplete" entry, and each unclean stop is judged for whether
an answered request could be missing its record: a run that wrote records after the answers
(logs from before record format 2), or a host that went down (its boot time changed) while
`requests.sync` was not "always", so the last records may not have reached the disk.

Checkpoints that the daemon wrote to its event log (`requests.checkpoint`) are compared with
the records when the event log is there: a rewrite or a cut-off end then shows even without
the key, as far as the event log was kept out of reach (shipped elsewhere).
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sovereignd.logs import sealing
from sovereignd.logs.files import rotated_files
from sovereignd.logs.records import LEDGER_NAME, LIVE_NAME, list_segments, read_ledger

EDITED = "edited"
DELETED = "deleted"
INSERTED = "inserted"
REORDERED = "reordered"
TRUNCATED = "truncated"
MISSING_FILE = "missing file"
UNSEALED = "unsealed segment"
WRONG_KEY = "wrong key"
BREAK_KINDS = (EDITED, DELETED, INSERTED, REORDERED, TRUNCATED, MISSING_FILE, UNSEALED, WRONG_KEY)

# How far ahead a missing sequence number is looked for, to tell a swap from a deletion.
_REORDER_WINDOW = 64


@dataclass(frozen=True)
class Break:
    """The first place where the records stop being provably complete and unaltered."""

    kind: str
    file: str
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"seq {self.seq} in {self.file}" if self.seq is not None else self.file
        return f"{self.kind} at {where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.file, "seq": self.seq, "message": self.message}


@dataclass
class VerifyResult:
    """What `verify_logs` found: counts for the report, and the first break if there is one."""

    broken: Break | None = None
    seals_checked: bool = False
    files: int = 0
    records: int = 0
    requests: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_ts: str | None = None
    last_ts: str | None = None
    first_epoch: int | None = None
    last_epoch: int | None = None
    epoch_changes: int = 0
    key_ids: list[str] = field(default_factory=list)
    removed_files: int = 0
    removed_through: int = 0
    restarts: int = 0
    unclean_restarts: list[int] = field(default_factory=list)
    torn_recoveries: list[int] = field(default_factory=list)
    rekeys: list[int] = field(default_factory=list)
    checkpoints_checked: int = 0
    closed: bool = False
    notes: list[str] = field(default_factory=list)
    starts: int = 0
    completed: int = 0
    incomplete: list[dict[str, Any]] = field(default_factory=list)
    open_starts: int = 0
    # Unclean stops after which an answered request could lack its record (see `_judge_stop`).
    exposures: list[dict[str, Any]] = field(default_factory=list)
    # One entry per writer start: seq, ts, format, sync, sync_interval_ms.
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.broken is None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "break": self.broken.to_json() if self.broken else None,
            "seals_checked": self.seals_checked, "files": self.files, "records": self.records,
            "requests": self.requests, "first_seq": self.first_seq, "last_seq": self.last_seq,
            "first_ts": self.first_ts, "last_ts": self.last_ts,
            "first_epoch": self.first_epoch, "last_epoch": self.last_epoch,
            "epoch_changes": self.epoch_changes, "key_ids": self.key_ids,
            "removed_files": self.removed_files, "removed_through": self.removed_through,
            "restarts": self.restarts, "unclean_restarts": self.unclean_restarts,
            "torn_recoveries": self.torn_recoveries, "rekeys": self.rekeys,
            "checkpoints_checked": self.checkpoints_checked, "closed": self.closed,
            "notes": self.notes, "starts": self.starts, "completed": self.completed,
            "incomplete": self.incomplete, "open_starts": self.open_starts,
            "exposures": self.exposures, "runs": self.runs,
        }

    def render(self) -> str:
        """The operator's and auditor's summary, a few lines of text."""
        head = "OK" if self.ok else f"BROKEN: {self.broken}"
        lines = [f"request log: {head}"]
        if self.records:
            lines.append(f"  {self.records} records ({self.requests} requests) in {self.files} "
                         f"file(s), seq {self.first_seq}..{self.last_seq}, "
                         f"{self.first_ts} .. {self.last_ts}")
            lines.append(f"  epochs {self.first_epoch}..{self.last_epoch} "
                         f"({self.epoch_changes} evolutions), key id(s) "
                         f"{', '.join(self.key_ids) or 'none'}")
        else:
            lines.append("  no records")
        if self.removed_files:
            lines.append(f"  {self.removed_files} older file(s) removed by retention "
                         f"(seq 1..{self.removed_through}), listed in {LEDGER_NAME}")
        lines.append(f"  {self.restarts} writer start(s); unclean: "
                     f"{_seqs(self.unclean_restarts)}; torn lines recovered: "
                     f"{_seqs(self.torn_recoveries)}; key changes: {_seqs(self.rekeys)}")
        lines.append(f"  {self.checkpoints_checked} event-log checkpoint(s) matched; the log "
                     + ("ends with a clean close" if self.closed else
                        "is open (the daemon is running, or stopped without closing it)"))
        if self.starts or self.incomplete:
            causes = Counter(str(x.get("reason")) for x in self.incomplete)
            lines.append(f"  {self.starts} request(s) started: {self.completed} completed, "
                         f"{len(self.incomplete)} incomplete"
                         + (f" ({', '.join(f'{n} {c}' for c, n in causes.items())})"
                            if causes else "")
                         + f", {self.open_starts} still open (in flight, or the daemon "
                           "stopped and has not started since)")
            lines.extend(f"  incomplete: seq {x['seq']} (started at seq {x['start_seq']}, "
                         f"{x.get('client')}, {x.get('model')}): {x.get('reason')}"
                         for x in self.incomplete[:10])
            if len(self.incomplete) > 10:
                lines.append(f"  ... and {len(self.incomplete) - 10} more incomplete")
        for x in self.exposures:
            lines.append(f"  RECORDS MAY BE MISSING before seq {x['seq']}: {x['message']}")
        if not self.seals_checked:
            lines.append("  seals NOT checked (no verification key given): continuity and the "
                         "hash chain only, which whoever can write the files could rebuild")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _seqs(values: list[int]) -> str:
    if not values:
        return "none"
    shown = ", ".join(f"seq {v}" for v in values[:5])
    return shown + (f" and {len(values) - 5} more" if len(values) > 5 else "")


def read_checkpoints(logs_dir: Path) -> dict[int, tuple[str, str]]:
    """seq -> (head hash, event time) from `requests.checkpoint` events in the event log."""
    found: dict[int, tuple[str, str]] = {}
    for path in rotated_files(logs_dir / "events.log"):
        try:
            f = path.open("rb")
        except OSError:
            continue
        with f:
            for line in f:
                if b'"requests.checkpoint"' not in line:
                    continue
                try:
                    ev = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                seq, head = ev.get("seq"), ev.get("head")
                if isinstance(seq, int) and isinstance(head, str) and seq > 0:
                    found[seq] = (head, str(ev.get("ts", "")))
    return found


def _read_file(path: Path) -> tuple[list[bytes], str | None]:
    """The file's lines (a last element without newline is torn) and a read problem, if any."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if path.name.endswith(".gz") or path.name == LIVE_NAME:
            return [], "the file disappeared while being verified"
        # Compressed since it was listed: the .gz replaced it, complete.
        return _read_file(path.with_name(path.name + ".gz"))
    except OSError as exc:
        return [], f"cannot read: {exc.strerror or exc}"
    problem = None
    if path.name.endswith(".gz"):
        d = zlib.decompressobj(wbits=31)
        try:
            data = d.decompress(raw)
        except zlib.error:
            return [], "not a valid gzip file"
        if not d.eof:
            problem = "the compressed file ends early"
        elif d.unused_data:
            problem = "data follows the end of the compressed stream"
    else:
        data = raw
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    else:
        # Mark the unterminated last line so the caller can tell it from a complete one.
        lines[-1] = lines[-1] + b"\0torn"
    return lines, problem


class _Verifier:
    """One verification run: walks the records in order, keeps the chain state, stops at a break."""

    def __init__(self, logs_dir: Path, keys: dict[str, bytes],
                 checkpoints: dict[int, tuple[str, str]], result: VerifyResult) -> None:
        self.logs_dir = logs_dir
        self.keys = keys
        self.checkpoints = checkpoints
        self.r = result
        self.expected = 1
        self.prev = sealing.GENESIS_PREV
        self.prev2: str | None = None
        self.prev_seq: int | None = None
        self.prev_file = ""
        self.epoch: int | None = None
        self.key_id: str | None = None
        self.lineage_key: bytes | None = None
        self.cached: tuple[int, bytes] | None = None
        self.verified_any = False
        # The writer run the records belong to, from its open (or a file's epoch) marker.
        self.writer_run: dict[str, Any] | None = None
        self.started: set[int] = set()

    def fail(self, kind: str, file: str, seq: int | None, message: str) -> bool:
        self.r.broken = Break(kind, file, seq, message)
        return False

    # --- the retention ledger --------------------------------------------------------------

    def start_from_ledger(self) -> bool:
        try:
            entries = read_ledger(self.logs_dir)
        except ValueError as exc:
            return self.fail(EDITED, LEDGER_NAME, None, str(exc))
        for entry in entries:
            first, last = entry.get("first"), entry.get("last")
            if not isinstance(first, int) or not isinstance(last, int) or last < first:
                return self.fail(EDITED, LEDGER_NAME, None,
                                 f"entry for {entry.get('file')} has no valid seq range")
            if first != self.expected:
                return self.fail(MISSING_FILE, LEDGER_NAME, self.expected,
                                 f"the retention ledger jumps from seq {self.expected - 1} to "
                                 f"{first} ({entry.get('file')}): records {self.expected}.."
                                 f"{first - 1} are neither kept nor listed as removed")
            self.expected = last + 1
            self.prev = str(entry.get("next_prev"))
            next_epoch = entry.get("next_epoch")
            self.epoch = next_epoch if isinstance(next_epoch, int) else None
            kid = entry.get("key_id")
            self.key_id = kid if isinstance(kid, str) else None
            self.r.removed_files += 1
            self.r.removed_through = last
        self.prev_file = LEDGER_NAME
        if entries:
            self.prev_seq = self.expected - 1
        return True

    # --- keys -------------------------------------------------------------------------------

    def key_for(self, epoch: int) -> bytes | None:
        if self.key_id is None or self.key_id not in self.keys:
            return None
        if self.cached is None or self.cached[0] > epoch:
            self.cached = (0, self.keys[self.key_id])
        start, key = self.cached
        key = sealing.evolve_to(key, start, epoch)
        self.cached = (epoch, key)
        return key

    # --- files ------------------------------------------------------------------------------

    def run(self) -> bool:
        if not self.start_from_ledger():
            return False
        checked: set[int] = set()
        # A running daemon may rotate while this reads: list again until no new file appears,
        # so the live file read last continues where the rotated ones end.
        while True:
            todo = [s for s in list_segments(self.logs_dir) if s.first not in checked]
            if not todo:
                break
            for seg in todo:
                checked.add(seg.first)
                if seg.last < self.expected:
                    self.r.notes.append(
                        f"{seg.name} is listed as removed in {LEDGER_NAME} but still present "
                        "(the removal was interrupted); not read")
                    continue
                if seg.first > self.expected:
                    return self.fail(MISSING_FILE, seg.name, self.expected,
                                     f"records {self.expected}..{seg.first - 1} are missing: a "
                                     "rotated file between the previous one and this was removed")
                if not self.check_file(seg.path, seg.first, seg.last):
                    return False
        live = self.logs_dir / LIVE_NAME
        if live.exists() and not self.check_file(live, None, None):
            return False
        return self.check_end()

    def check_file(self, path: Path, first: int | None, last: int | None) -> bool:
        name = path.name
        lines, problem = _read_file(path)
        self.r.files += 1
        if first is not None and lines and first < self.expected:
            return self.fail(INSERTED, name, first,
                             f"the file's name says it starts at seq {first}, but the records "
                             f"before it already end at {self.expected - 1}")
        for j, line in enumerate(lines):
            if line.endswith(b"\0torn"):
                size = len(line) - 5
                return self.fail(TRUNCATED, name, self.expected,
                                 f"the file ends in the middle of a record ({size} bytes after "
                                 f"seq {self.expected - 1}): the writer stopped mid-line or the "
                                 "file was cut")
            if not self.check_line(name, lines, j):
                return False
        if problem is not None:
            return self.fail(TRUNCATED if "ends early" in problem else EDITED, name,
                             self.expected, f"{problem}, after seq {self.expected - 1}")
        if last is not None and self.expected - 1 != last:
            return self.fail(TRUNCATED, name, self.expected,
                             f"the file ends at seq {self.expected - 1} but its name says it "
                             f"runs to {last}: records at its end were removed")
        return True

    def check_line(self, name: str, lines: list[bytes], j: int) -> bool:
        line = lines[j]
        rec = _record(line)
        seq = rec.get("seq") if rec is not None else None
        if rec is None or not isinstance(seq, int):
            return self.fail(EDITED, name, self.expected,
                             "the line is not a valid record (not JSON or no sequence number)")
        if seq != self.expected:
            return self.seq_break(name, lines, j, seq)
        if rec.get("prev") != self.prev:
            if self.prev2 is not None and rec.get("prev") == self.prev2:
                return self.fail(INSERTED, self.prev_file, self.prev_seq,
                                 "this record is not in the chain: the next one links to the "
                                 "record before it")
            return self.fail(EDITED, self.prev_file, self.prev_seq,
                             "its content no longer matches the hash that the next record "
                             "holds")
        line_hash = sealing.line_hash(line)
        checkpoint = self.checkpoints.get(seq)
        if checkpoint is not None:
            if checkpoint[0] != line_hash:
                return self.fail(EDITED, name, seq,
                                 f"differs from the checkpoint the daemon logged at "
                                 f"{checkpoint[1]} (the chain was rewritten after it)")
            self.r.checkpoints_checked += 1
        if not self.check_epoch_and_seal(name, lines, j, rec, seq):
            return False
        self.count(rec, seq)
        self.prev2, self.prev = self.prev, line_hash
        self.prev_seq, self.prev_file = seq, name
        self.expected = seq + 1
        return True

    def seq_break(self, name: str, lines: list[bytes], j: int, seq: int) -> bool:
        if seq > self.expected:
            for ahead in lines[j + 1:j + 1 + _REORDER_WINDOW]:
                if _seq_of(ahead) == self.expected:
                    return self.fail(REORDERED, name, self.expected,
                                     f"seq {seq} comes before seq {self.expected}")
            if seq == self.expected + 1:
                missing = f"record {self.expected} is missing"
            else:
                missing = f"records {self.expected}..{seq - 1} are missing"
            return self.fail(DELETED, name, self.expected, missing)
        return self.fail(INSERTED, name, seq,
                         f"a record numbered {seq} appears after seq {self.expected - 1}")

    def check_epoch_and_seal(self, name: str, lines: list[bytes], j: int, rec: dict[str, Any],
                             seq: int) -> bool:
        kind = rec.get("kind")
        epoch = rec.get("epoch")
        try:
            core, seal = sealing.split_line(lines[j])
        except ValueError:
            return self.fail(EDITED, name, seq, "the record does not end with its seal")
        if seal is None or not isinstance(epoch, int):
            return self.fail(UNSEALED, name, seq,
                             "records from here are not sealed: the daemon had no sealing key "
                             "(`sovereignd logs init-key` was not run, or its state was lost)")
        if kind == "open" and rec.get("rekey"):
            kid = rec.get("key_id")
            self.r.rekeys.append(seq)
            if self.keys and kid not in self.keys:
                return self.fail(UNSEALED, name, seq,
                                 f"records from here are sealed with key id {kid}, which was "
                                 "not given: the sealing key was replaced here; verify them "
                                 "with the new verification key (--key may be repeated)")
            self.key_id = kid if isinstance(kid, str) else None
            self.cached = None
            self.epoch = epoch
        elif self.epoch is None:
            self.epoch = epoch
            kid = rec.get("key_id")
            if self.key_id is None and isinstance(kid, str):
                self.key_id = kid
        elif epoch != self.epoch:
            if epoch > self.epoch:
                return self.fail(UNSEALED, name, seq,
                                 f"the epoch jumps from {self.epoch} to {epoch} without an epoch "
                                 "marker: records sealed with the keys between are missing")
            return self.fail(EDITED, name, seq,
                             f"epoch {epoch} where {self.epoch} was expected")
        if self.key_id is not None and self.key_id not in self.r.key_ids:
            self.r.key_ids.append(self.key_id)
        if self.keys and not self.check_seal(name, lines[j + 1:j + 2], core=core, seal=seal,
                                         epoch=epoch, seq=seq):
            return False
        if kind == "epoch":
            nxt = rec.get("next_epoch")
            if nxt != epoch + 1:
                return self.fail(EDITED, name, seq,
                                 f"an epoch marker announces epoch {nxt} after {epoch}")
            self.epoch = nxt
            self.r.epoch_changes += 1
        return True

    def check_seal(self, name: str, following: list[bytes], *, core: bytes, seal: str,
                   epoch: int, seq: int) -> bool:
        key = self.key_for(epoch)
        if key is None:
            if not self.verified_any:
                given = ", ".join(sorted(self.keys))
                return self.fail(WRONG_KEY, name, seq,
                                 f"the records are sealed with key id {self.key_id}; the key "
                                 f"given has id {given}")
            return self.fail(UNSEALED, name, seq,
                             f"no key given for key id {self.key_id}")
        if sealing.check_seal(key, core, seal):
            self.verified_any = True
            return True
        if following and self.fits_in_place(following[0], key, seq):
            return self.fail(INSERTED, name, seq,
                             "this record's seal is not valid and the records after it were "
                             "renumbered: it was inserted")
        return self.fail(EDITED, name, seq,
                         f"the seal does not match (epoch {epoch}): the record was changed "
                         "after it was written")

    def fits_in_place(self, next_line: bytes, key: bytes, seq: int) -> bool:
        """True if the next record verifies in this record's place: this one was inserted.

        The next record is tried with this record's sequence number and predecessor, which
        undoes both a renumbering of the records after an insertion and a duplicated number.
        """
        try:
            rec = orjson.loads(next_line)
            seal = rec.pop("seal")
            rec["seq"] = seq
            rec["prev"] = self.prev
            core = orjson.dumps(rec)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return False
        if not isinstance(seal, str) or rec.get("epoch") != self.epoch:
            return False
        return sealing.check_seal(key, core, seal)

    def count(self, rec: dict[str, Any], seq: int) -> None:
        r = self.r
        r.records += 1
        kind = rec.get("kind")
        if kind == "request":
            r.requests += 1
            start = rec.get("start_seq")
            if isinstance(start, int):
                r.completed += 1
                self.started.discard(start)
        elif kind == "start":
            r.starts += 1
            self.started.add(seq)
        elif kind == "incomplete":
            start = rec.get("start_seq")
            self.started.discard(start if isinstance(start, int) else -1)
            r.incomplete.append({k: rec.get(k) for k in (
                "seq", "ts", "start_seq", "id", "client", "model", "reason", "stopped_after")})
        elif kind == "open":
            r.restarts += 1
            if rec.get("unclean"):
                r.unclean_restarts.append(seq)
                self._judge_stop(rec, seq)
            if rec.get("torn"):
                r.torn_recoveries.append(seq)
            self.writer_run = {"seq": seq, "ts": rec.get("ts"), "format": rec.get("format"),
                        "sync": rec.get("sync"), "sync_interval_ms": rec.get("sync_interval_ms"),
                        "boot": rec.get("boot")}
            r.runs.append(self.writer_run)
        elif kind == "epoch" and self.writer_run is None:
            # The run's open marker was removed by retention: its files still name the format.
            self.writer_run = {"seq": None, "ts": None, "format": rec.get("format"),
                               "sync": None, "sync_interval_ms": None, "boot": None}
        r.open_starts = len(self.started)
        r.closed = kind == "close"
        if r.first_seq is None:
            r.first_seq, r.first_ts, r.first_epoch = seq, rec.get("ts"), rec.get("epoch")
        r.last_seq, r.last_ts, r.last_epoch = seq, rec.get("ts"), self.epoch

    def _judge_stop(self, rec: dict[str, Any], seq: int) -> None:
        """After an unclean stop: could an answered request of the stopped run lack a record?"""
        run = self.writer_run
        if self.r.records <= 1:
            return  # nothing was written before this start
        fmt = run.get("format") if run is not None else None
        if not isinstance(fmt, int) or fmt < 2:
            self.r.exposures.append({
                "seq": seq, "cause": "records_after_answers",
                "message": "the run that stopped here wrote each record after its answer had "
                           "gone out (record format 1): a request answered just before the "
                           "stop may have no record"})
            return
        assert run is not None
        before, now = run.get("boot"), rec.get("boot")
        if not (isinstance(before, int) and isinstance(now, int)) or abs(now - before) <= 2:
            return  # the process stopped, the host did not: the page cache kept every record
        sync = run.get("sync")
        if sync == "always":
            return
        window = (f"the last {run.get('sync_interval_ms')} ms" if sync == "interval"
                  else "the last ~30 s (the OS's writeback)")
        self.r.exposures.append({
            "seq": seq, "cause": "host_down_unsynced", "sync": sync,
            "message": f"the host went down (its boot time changed) while requests.sync was "
                       f"{sync}: records of answers in {window} before the stop may not have "
                       "reached the disk"})

    def check_end(self) -> bool:
        last = self.expected - 1
        beyond = [s for s in self.checkpoints if s > last]
        if beyond:
            s = min(beyond)
            return self.fail(TRUNCATED, LIVE_NAME, last + 1,
                             f"the event log has a checkpoint at seq {s} "
                             f"({self.checkpoints[s][1]}), but the records end at {last}: "
                             "records were removed from the end")
        return True


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _seq_of(line: bytes) -> int | None:
    rec = _record(line)
    seq = rec.get("seq") if rec is not None else None
    return seq if isinstance(seq, int) else None


def verify_logs(logs_dir: Path, keys: Iterable[bytes] | bytes | None = None,
                state_dir: Path | None = None, *, checkpoints: bool = True) -> VerifyResult:
    """Check every request-log file in order and return the counts or the first break.

    `keys` are the auditor's epoch-0 verification keys (one, or several after a re-key); None
    checks continuity and the chain only. With `state_dir`, the daemon's current epoch is
    compared with the last record's, which shows records cut off at the end. With
    `checkpoints`, the event log's checkpoints in `logs_dir` are compared with the records.
    """
    if isinstance(keys, bytes | bytearray):
        keys = [bytes(keys)]
    by_id = {sealing.key_id(k): k for k in keys or ()}
    result = VerifyResult(seals_checked=bool(by_id))
    found = read_checkpoints(logs_dir) if checkpoints else {}
    verifier = _Verifier(logs_dir, by_id, found, result)
    if not verifier.run():
        return result
    if state_dir is not None:
        _compare_state(verifier, state_dir, result)
    return result


def _compare_state(v: _Verifier, state_dir: Path, result: VerifyResult) -> None:
    try:
        state = sealing.read_state(state_dir)
    except sealing.SealStateError as exc:
        result.notes.append(str(exc))
        return
    if state is None:
        if result.last_epoch is not None:
            result.notes.append("no sealing state on this machine: the daemon cannot seal new "
                                "records (run `sovereignd logs init-key`)")
        return
    state.erase()
    if state.key_id != v.key_id or v.epoch is None:
        if result.records:
            result.notes.append(f"the sealing state has key id {state.key_id}, the last records "
                                f"{v.key_id}: the next start records a change of key")
        return
    if state.epoch > v.epoch:
        result.broken = Break(
            TRUNCATED, LIVE_NAME, v.expected,
            f"the daemon's sealing state is at epoch {state.epoch} but the records end in "
            f"epoch {v.epoch} at seq {v.expected - 1}: records of later epochs were removed")
