"""The request records: one sealed, chained JSON line per request, written by one writer.

The gateway calls `RequestLog.start(fields)` when it accepts a request for the model server and
`RequestLog.record(fields)` once the request is finished, before the end of the answer goes out,
then awaits `RequestLog.durable(seq)` (which returns once the record is as durable as
`requests.sync` promises). Each call appends one line to `logs.dir/requests.log` and returns
the line's sequence number; the event loop is the only caller.
How the daemon wires it up:

    log = RequestLog.from_config(cfg, emit=events.emit)
    log.open()                                   # recovery; raises RequestLogError
    task = asyncio.create_task(maintain(log, events.emit, stop,
                                        checkpoint_interval=cfg.requests.checkpoint_interval))
    ...                                          # the proxy: s = log.start({...})
    ...                                          #   seq = log.record({..., "start_seq": s})
    ...                                          #   await log.durable(seq); send the end
    stop.set(); await task                       # after the gateway stopped taking requests
    events.emit("requests.checkpoint", **log.close().fields(), final=True)

The proxy reads `log.record_bodies` ("none", "hash", "full") to know whether to hash or keep
the bodies; with "hash" it may pass `req_sha256`/`resp_sha256` (computed while streaming) or
the bodies themselves (hashed here). If `record()` raises RequestLogError the record was not
written: the gateway should answer 503 rather than serve requests it cannot record.

Record schema (keys in this order; `jq` reads the files, `.gz` ones through `zcat`):

    ts                 UTC time the record was written (request end), "2026-11-22T02:11:00.123Z"
    seq                sequence number: +1 per record, across files and restarts, never skipped
    kind               "request"; "start" (a request was accepted for the server) and
                       "incomplete" (a started request whose end the daemon never recorded);
                       or a marker: "open", "epoch", "retention", "close"
    --- request records (the gateway fills these; a missing one is null) ---
    id                 request id (also returned to the client as X-Request-ID)
    client             client key name, or null before authentication
    method, path       HTTP method and path as received
    model              model name the client asked for
    status             HTTP status returned to the client
    stream             true for a server-sent-events response
    latency_ms         request start to the record, which is written just before the end of
                       the answer is released to the client (float, ms)
    ttfb_ms            request start to first response byte
    ttft_ms            request start to first token (streams)
    prompt_tokens      from the server's usage block
    completion_tokens  idem
    bytes_in           request body bytes
    bytes_out          response body bytes
    remote             client address
    error              error class ("upstream_timeout", "client_disconnect", ...) or null
    start_seq          seq of the request's "start" entry (null for requests refused before
                       they reached the server, which have none)
    req_sha256, resp_sha256   with requests.record_bodies: hash (hex SHA-256 of the bodies)
    req_body, resp_body       with requests.record_bodies: full (the bodies as text)
    --- start entries (no content: who, which model, when, which request) ---
    start:     id, client, method, path, model, remote
    incomplete: id, client, method, path, model, start_seq, reason ("unclean_stop": the
               daemon stopped without recording the request's end; the client received at
               most part of an answer), stopped_after (ts of the last line the stopped run
               wrote: the stop came after it)
    --- markers ---
    open:      key_id, unclean (the previous run did not close the log), torn (a partial last
               line found after a crash and removed: its byte count, SHA-256 and the seq it
               followed), rekey (the sealing key lineage changed here), sealed (false: no key),
               format (2: request records are written before the answer ends, with start
               entries; absent in older logs), sync and sync_interval_ms (`requests.sync` of
               this run), boot (the host's boot time: a different one after an unclean stop
               means the host itself went down, e.g. a power loss)
    epoch:     key_id, next_epoch, reason ("rotation", "interval"); sealed with the old key;
               format; on rotation in_flight (the start entries still open, so that recovery
               needs only the live file)
    retention: file, first, last, reason (a rotated file was removed by retention)
    close:     (the writer closed cleanly)
    --- chain and seal, on every record ---
    prev               SHA-256 of the previous line (64 zeros before seq 1)
    epoch              sealing epoch, or null when no key was available
    seal               HMAC-SHA256 of the line up to here under the epoch's key, or null

Durability (`requests.sync`): "always" fsyncs before `durable()` returns (concurrent requests
share one fsync: group commit); "interval" fsyncs every `sync_interval` in a worker thread
(`maintain`), so a power loss can take the records of the last interval; "never" leaves it to
the operating system (rotation and close still fsync). A SIGKILL loses nothing in any mode:
the records are in the kernel's page cache once `record()` returns.

Files: `requests.log` is the live file; every file starts with a marker (open or epoch) that
names the key lineage. Rotated files are `requests-<start UTC>-<first seq>-<last seq>.log`,
then `.log.gz` once compressed in a worker thread (the plain file is removed only after the
`.gz` is complete, fsynced and renamed into place). Files removed by retention are listed in the
append-only ledger `requests.retention` so the verifier can start from the oldest file left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import gzip
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from sovereignd.config import Config
from sovereignd.errors import SovereigndError
from sovereignd.fsutil import atomic_write
from sovereignd.logs import sealing
from sovereignd.logs.eventlog import Emit, discard
from sovereignd.logs.records import (
    LEDGER_NAME,
    LIVE_NAME,
    Segment,
    first_line,
    last_marker_line,
    list_segments,
    open_lines,
    read_ledger,
    rotated_name,
    size_of,
)

BODY_MODES = ("none", "hash", "full")
SYNC_MODES = ("always", "interval", "never")
# The record format written by this version: 2 = records before the answer ends, starts logged.
FORMAT = 2
START_FIELDS = ("id", "client", "method", "path", "model", "remote")
# What an "incomplete" entry repeats from its start entry.
_CARRIED = ("id", "client", "method", "path", "model")

REQUEST_FIELDS = ("id", "client", "method", "path", "model", "status", "stream", "latency_ms",
                  "ttfb_ms", "ttft_ms", "prompt_tokens", "completion_tokens", "bytes_in",
                  "bytes_out", "remote", "error", "start_seq",
                  # the client's own X-Request-ID and its SDK's retry count (issue 16)
                  "client_request_id", "retries")
BODY_FIELDS = ("req_sha256", "resp_sha256", "req_body", "resp_body")
_ACCEPTED = frozenset(REQUEST_FIELDS + BODY_FIELDS)

# Retention also runs this often (seconds) without rotations, for requests.max_age.
RETENTION_CHECK_INTERVAL = 60.0


class RequestLogError(SovereigndError):
    """The request log cannot be opened or written; the message says what to do."""


class _Timestamps:
    """UTC millisecond timestamps, formatting the date and time only once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def format(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            stamp = dt.datetime.fromtimestamp(second, tz=dt.UTC)
            self._prefix = stamp.strftime("%Y-%m-%dT%H:%M:%S.")
        millis = int((now - second) * 1000)
        return f"{self._prefix}{millis:03d}Z"


def _open_starts(lines: list[bytes]) -> dict[int, dict[str, Any]]:
    """Start entries of one file with no end in it, plus those its first marker carried in."""
    open_: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(lines):
        if n == 0 and b'"in_flight":' in line:
            with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
                for item in orjson.loads(line).get("in_flight") or ():
                    if isinstance(item, dict) and isinstance(item.get("start_seq"), int):
                        open_[item["start_seq"]] = {k: item.get(k) for k in _CARRIED}
            continue
        # orjson writes no spaces: these byte tests skip the lines that need no parsing.
        if b'"kind":"start"' in line:
            rec = _loads(line)
            if rec is not None and isinstance(rec.get("seq"), int):
                open_[rec["seq"]] = {k: rec.get(k) for k in _CARRIED}
        elif b'"start_seq":' in line and b'"start_seq":null' not in line:
            rec = _loads(line)
            if rec is not None and isinstance(rec.get("start_seq"), int):
                open_.pop(rec["start_seq"], None)
    return open_


def _loads(line: bytes) -> dict[str, Any] | None:
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _boot_time() -> int | None:
    """The host's boot time, POSIX seconds (psutil: /proc/stat btime on Linux, kern.boottime
    on macOS); None where it cannot be read."""
    try:
        return int(psutil.boot_time())
    except (OSError, RuntimeError):
        return None


def _parse_ts(text: str) -> float:
    stamp = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def _next_midnight(t: float) -> float:
    day = dt.datetime.fromtimestamp(t, tz=dt.UTC).date() + dt.timedelta(days=1)
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _finish_rotated(fd: int, dirty: bool, compress: Path | None, mode: int) -> None:
    """In the worker: make a rotated file durable, close it, and compress it if asked."""
    try:
        if dirty:
            os.fsync(fd)
    finally:
        os.close(fd)
    if compress is not None:
        compress_file(compress, mode)


def compress_file(plain: Path, mode: int = 0o640) -> Path:
    """Gzip a rotated file beside itself; the plain file goes only once the .gz is durable."""
    gz = plain.with_name(plain.name + ".gz")
    tmp = plain.with_name(plain.name + ".gz.tmp")
    with plain.open("rb") as src, tmp.open("wb") as raw:
        os.fchmod(raw.fileno(), mode)
        # mtime=0: the same input gives the same bytes, so copies can be compared by hash.
        with gzip.GzipFile(filename=plain.name, mode="wb", fileobj=raw, mtime=0) as out:
            shutil.copyfileobj(src, out, 1 << 20)
        raw.flush()
        os.fsync(raw.fileno())
    tmp.replace(gz)
    _fsync_dir(plain.parent)
    plain.unlink()
    _fsync_dir(plain.parent)
    return gz


# ---------------------------------------------------------------------------------------------
# The writer


@dataclass(frozen=True)
class Checkpoint:
    """Where the chain stands: written to the event log so a later edit shows against it."""

    seq: int
    head: str
    epoch: int | None
    ts: str

    def fields(self) -> dict[str, Any]:
        return {"seq": self.seq, "head": self.head, "epoch": self.epoch, "record_ts": self.ts}


@dataclass
class _Head:
    """What recovery learns about the end of the existing log."""

    seq: int = 0
    prev: str = sealing.GENESIS_PREV
    epoch: int | None = None        # epoch the next record should have, per the log
    key_id: str | None = None       # lineage of the last marker
    last_kind: str | None = None
    live_first: int | None = None   # first seq in the live file, if it has records
    live_start: float | None = None  # its first record's time
    live_size: int = 0
    torn: dict[str, Any] | None = None
    last_ts: str | None = None
    # start seq -> the start entry's carried fields, for starts with no end in the log
    in_flight: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)


class RequestLog:
    """The single writer of request records: sealing, chaining, rotation, compression, retention.

    Construct, then `open()`; call `record()` per request, `tick()` and `sync()` from a timer
    (see `maintain`), and `close()` at shutdown. Not thread-safe: use it from one thread (the
    event loop); compression runs in its own worker thread.
    """

    def __init__(self, logs_dir: Path, state_dir: Path, *,
                 rotate_bytes: int = 64 * 2**20, rotate_daily: bool = True,
                 compress: bool = True, keep_files: int = 0, max_age: float = 0.0,
                 max_total_bytes: int = 0, record_bodies: str = "none",
                 seal_interval: float = 900.0, require_seal: bool = False,
                 sync: str = "interval", sync_interval: float = 0.05, emit: Emit = discard,
                 clock: Callable[[], float] = time.time, file_mode: int = 0o640) -> None:
        if record_bodies not in BODY_MODES:
            raise ValueError(f"record_bodies must be one of {', '.join(BODY_MODES)}")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}")
        self.logs_dir = logs_dir
        self.state_dir = state_dir
        self.rotate_bytes = rotate_bytes
        self.rotate_daily = rotate_daily
        self.compress = compress
        self.keep_files = keep_files
        self.max_age = max_age
        self.max_total_bytes = max_total_bytes
        self.record_bodies = record_bodies
        self.seal_interval = seal_interval
        self.require_seal = require_seal
        self.sync_mode = sync
        self.sync_interval = sync_interval
        self._emit = emit
        self._clock = clock
        self._mode = file_mode
        self._live = logs_dir / LIVE_NAME
        self._ts = _Timestamps()
        self._fd: int | None = None
        self._size = 0
        self._dirty = False
        self._seq = 0
        self._head = sealing.GENESIS_PREV
        self._last_ts = ""
        self._state: sealing.SealState | None = None
        self._key: bytearray | None = None
        self._epoch: int | None = None
        self._key_id: str | None = None
        self._file_first = 0
        self._file_start = 0.0
        self._epoch_due = float("inf")
        self._day_end = float("inf")
        self._next_check = float("inf")
        self._next_retention = float("inf")
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Rotated files with work pending in the worker (fsync, compression): retention and
        # error reports wait for it.
        self._compressing: dict[Path, concurrent.futures.Future[Any]] = {}
        # Started requests not yet ended: start seq -> the fields an "incomplete" repeats.
        self._in_flight: dict[int, dict[str, Any]] = {}
        # Group commit: the highest seq known durable, and the fsync under way if any.
        self._synced_seq = 0
        self._flush: asyncio.Future[None] | None = None
        self._sync_pool: concurrent.futures.ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, cfg: Config, emit: Emit = discard,
                    clock: Callable[[], float] = time.time) -> RequestLog:
        """A writer configured from a loaded `config.Config` (its `requests:` section)."""
        r = cfg.requests
        return cls(cfg.logs.dir, cfg.state_dir, rotate_bytes=r.rotate_bytes,
                   rotate_daily=r.rotate_daily, compress=r.compress, keep_files=r.keep_files,
                   max_age=r.max_age, max_total_bytes=r.max_total_bytes,
                   record_bodies=r.record_bodies,
                   seal_interval=r.seal_interval, require_seal=r.require_seal,
                   sync=r.sync, sync_interval=r.sync_interval, emit=emit, clock=clock)

    # --- opening and recovery --------------------------------------------------------------

    def open(self) -> None:
        """Recover the chain's head from the files, reconcile the key, and write an open marker."""
        self.logs_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="requests-gzip")
        # fsyncs get their own thread: they must not queue behind a compression.
        self._sync_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="requests-fsync")
        self._finish_interrupted_compression()
        head = self._recover()
        self._seq, self._head = head.seq, head.prev
        self._synced_seq = head.seq
        self._in_flight = dict(head.in_flight)
        self._state = sealing.read_state(self.state_dir)
        rekey = self._reconcile_key(head)
        now = self._clock()
        self._open_live(head)
        if head.live_first is not None and (
                self._size >= self.rotate_bytes
                or (self.rotate_daily and now >= _next_midnight(self._file_start))):
            self._rotate(now, "day" if self._size < self.rotate_bytes else "size")
        if head.torn is not None:
            self._emit("requests.torn_line", level="error", after_seq=head.seq,
                       bytes=head.torn["bytes"], saved=head.torn.get("saved"),
                       hint="the daemon stopped in the middle of writing a record; the partial "
                            "line was moved aside and the open marker records it")
        self._write_marker("open", {
            "key_id": self._key_id, "unclean": head.last_kind not in (None, "close"),
            "torn": head.torn, "rekey": rekey, "sealed": self._key is not None,
            "format": FORMAT, "sync": self.sync_mode,
            "sync_interval_ms": round(self.sync_interval * 1000, 3), "boot": _boot_time()},
            now)
        # The requests the stopped run had accepted and never ended become visible.
        self._close_in_flight("unclean_stop", head.last_ts, now)
        self.sync()
        self._schedule(now)
        self._apply_retention(now)

    def _finish_interrupted_compression(self) -> None:
        for p in self.logs_dir.glob("requests-*.log.gz.tmp"):
            p.unlink()
        for seg in list_segments(self.logs_dir):
            if seg.compressed:
                continue
            twin = seg.path.with_name(seg.name + ".gz")
            if twin.exists():
                seg.path.unlink()  # the .gz was renamed into place, so it is complete
            elif self.compress:
                self._submit_compression(seg.path)

    def _recover(self) -> _Head:
        head = _Head()
        data = b""
        with contextlib.suppress(FileNotFoundError):
            data = self._live.read_bytes()
        if data:
            cut = data.rfind(b"\n") + 1
            if cut < len(data):
                head.torn = self._set_aside_torn(data[cut:])
                os.truncate(self._live, cut)
                data = data[:cut]
        lines = data.splitlines()
        if lines:
            first = self._parse(lines[0], self._live, "first")
            head.live_first = int(first["seq"])
            head.live_start = _parse_ts(str(first["ts"]))
            head.live_size = len(data)
            source_data, source = data, self._live
        else:
            segments = list_segments(self.logs_dir)
            if not segments:
                ledger = read_ledger(self.logs_dir)
                if ledger:
                    raise RequestLogError(
                        f"{self.logs_dir}: every request-log file is gone but {LEDGER_NAME} "
                        "lists removed ones; restore the files from backup before starting")
                return head
            source = segments[-1].path
            with open_lines(source) as f:
                source_data = f.read()
            lines = source_data.splitlines()
        last_line = lines[-1]
        last = self._parse(last_line, source, "last")
        head.seq = int(last["seq"])
        head.prev = sealing.line_hash(last_line)
        head.last_ts = last.get("ts") if isinstance(last.get("ts"), str) else None
        head.in_flight = _open_starts(lines)
        head.last_kind = str(last.get("kind"))
        epoch = last.get("epoch")
        head.epoch = last.get("next_epoch") if head.last_kind == "epoch" else epoch
        marker = last_marker_line(source_data)
        if marker is not None:
            head.key_id = self._parse(marker, source, "last marker").get("key_id")
        return head

    def _parse(self, line: bytes, path: Path, which: str) -> dict[str, Any]:
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
            raise RequestLogError(
                f"{path}: the {which} record is not a valid request record, so the log cannot "
                "be continued from it. The file was damaged or edited: run `sovereignd logs "
                "verify` to locate the damage and keep the file as evidence")
        return rec

    def _set_aside_torn(self, fragment: bytes) -> dict[str, Any]:
        # The fragment may be most of a real record: keep it as evidence, out of the chain.
        stamp = dt.datetime.fromtimestamp(self._clock(), tz=dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        saved = self.logs_dir / f"requests-torn-{stamp}.bin"
        atomic_write(saved, fragment, mode=self._mode)
        return {"bytes": len(fragment), "sha256": hashlib.sha256(fragment).hexdigest(),
                "saved": saved.name}

    def _reconcile_key(self, head: _Head) -> bool:
        """Line the key state up with the log; True if the records change key lineage here."""
        state = self._state
        if state is None:
            if self.require_seal:
                raise RequestLogError(
                    f"no sealing key in {sealing.state_path(self.state_dir)}: run `sovereignd "
                    "logs init-key` and give the printed key to the auditor, or set "
                    "requests.require_seal: false to write unsealed records")
            self._emit("requests.unsealed", level="error",
                       state=str(sealing.state_path(self.state_dir)),
                       hint="records are written without seals; `sovereignd logs verify` will "
                            "report them as an unsealed segment. Run `sovereignd logs init-key`")
            return False
        rekey = False
        expected = head.epoch
        if head.seq == 0:
            pass  # a new log starts with whatever epoch the state has
        elif expected is None or (head.key_id is not None and head.key_id != state.key_id):
            rekey = True
        elif state.epoch == expected - 1:
            # The epoch marker was written but the daemon stopped before the evolved key
            # replaced the old one in the state file: finish the evolution now.
            state.advance(self._clock)
            sealing.write_state(self.state_dir, state)
        elif state.epoch < expected:
            rekey = True
        elif state.epoch > expected:
            self._emit("requests.epoch_gap", level="error", log_epoch=expected,
                       state_epoch=state.epoch,
                       hint="the sealing state is ahead of the log: records of the epochs "
                            "between are missing; `sovereignd logs verify` will report it")
        if rekey:
            self._emit("requests.rekey", level="warning", key_id=state.key_id,
                       hint="the sealing key differs from the one the log was sealed with; "
                            "the auditor needs the new verification key for records from here")
        self._key = state.key
        self._epoch = state.epoch
        self._key_id = state.key_id
        return rekey

    def _open_live(self, head: _Head) -> None:
        self._fd = os.open(self._live, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           self._mode)
        self._size = os.fstat(self._fd).st_size
        if head.live_first is not None and head.live_start is not None:
            self._file_first, self._file_start = head.live_first, head.live_start
        else:
            self._file_first, self._file_start = self._seq + 1, self._clock()

    # --- writing -----------------------------------------------------------------------------

    def start(self, fields: Mapping[str, Any]) -> int:
        """Append the start entry of a request accepted for the server; return its seq.

        `fields` may hold START_FIELDS (others are ignored: no content goes in a start).
        Raises RequestLogError if it cannot be written: the request should then be refused.
        """
        now, rec = self._entry("start", fields, START_FIELDS)
        seq = self._append(rec)
        self._in_flight[seq] = {name: rec[name] for name in _CARRIED}
        if self._size >= self.rotate_bytes:
            self._rotate(now, "size")
        return seq

    def _entry(self, kind: str, fields: Mapping[str, Any],
               names: Sequence[str]) -> tuple[float, dict[str, Any]]:
        """The time and the new entry of `kind` with `names` taken from `fields` (missing ones
        null), after any rotation or maintenance due; RequestLogError if the log is closed."""
        if self._fd is None:
            raise RequestLogError("the request log is not open")
        now = self._clock()
        if now >= self._next_check:
            self._due(now)
        get = fields.get
        rec: dict[str, Any] = {"ts": self._ts.format(now), "seq": 0, "kind": kind}
        for name in names:
            rec[name] = get(name)
        return now, rec

    def record(self, fields: Mapping[str, Any]) -> int:
        """Append one request record and return its sequence number.

        `fields` has keys from REQUEST_FIELDS (missing ones are null) and, depending on
        `record_bodies`, BODY_FIELDS; any other key is a programming error (ValueError). Raises
        RequestLogError if the record cannot be written: the gateway should then stop serving.
        """
        unknown = fields.keys() - _ACCEPTED
        if unknown:
            raise ValueError(f"unknown request record field(s): {', '.join(sorted(unknown))}")
        now, rec = self._entry("request", fields, REQUEST_FIELDS)
        if self.record_bodies != "none":
            self._add_bodies(rec, fields)
        seq = self._append(rec)
        start_seq = rec["start_seq"]
        if isinstance(start_seq, int):
            self._in_flight.pop(start_seq, None)
        if self._size >= self.rotate_bytes:
            self._rotate(now, "size")
        return seq

    def _add_bodies(self, rec: dict[str, Any], fields: Mapping[str, Any]) -> None:
        for side in ("req", "resp"):
            body = fields.get(f"{side}_body")
            if self.record_bodies == "hash":
                digest = fields.get(f"{side}_sha256")
                if digest is None and body is not None:
                    raw = body.encode() if isinstance(body, str) else bytes(body)
                    digest = hashlib.sha256(raw).hexdigest()
                rec[f"{side}_sha256"] = digest
            else:
                if isinstance(body, bytes | bytearray):
                    body = bytes(body).decode("utf-8", "replace")
                rec[f"{side}_body"] = body

    def _append(self, rec: dict[str, Any]) -> int:
        seq = self._seq + 1
        rec["seq"] = seq
        rec["prev"] = self._head
        rec["epoch"] = self._epoch
        core = orjson.dumps(rec)
        key = self._key
        line = sealing.sealed_line(core, None if key is None else sealing.seal_bytes(key, core))
        self._write(line + b"\n")
        # Only a written record consumes its number: a failed write is retried with the same.
        self._seq = seq
        self._head = sealing.line_hash(line)
        self._last_ts = rec["ts"]
        return seq

    def _write(self, data: bytes) -> None:
        fd = self._fd
        assert fd is not None
        try:
            written = os.write(fd, data)
        except OSError as exc:
            self._undo_partial_write()
            raise RequestLogError(
                f"{self._live}: cannot write a request record: {exc.strerror or exc}. "
                "Free disk space or fix the log folder's permissions; requests are not "
                "recorded until then") from exc
        if written != len(data):
            self._undo_partial_write()
            raise RequestLogError(
                f"{self._live}: only {written} of {len(data)} bytes of a request record were "
                "written (disk full?). Free disk space; requests are not recorded until then")
        self._size += len(data)
        self._dirty = True

    def _undo_partial_write(self) -> None:
        # Leave no partial line behind: the next record must start on a clean line.
        assert self._fd is not None
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._size)

    def _write_marker(self, kind: str, extra: dict[str, Any], now: float) -> int:
        rec: dict[str, Any] = {"ts": self._ts.format(now), "seq": 0, "kind": kind}
        rec.update(extra)
        return self._append(rec)

    def _close_in_flight(self, reason: str, stopped_after: str | None, now: float) -> None:
        """Write an "incomplete" entry for every started request that has no end recorded."""
        for start_seq, carried in sorted(self._in_flight.items()):
            rec: dict[str, Any] = {"ts": self._ts.format(now), "seq": 0, "kind": "incomplete"}
            rec.update({name: carried.get(name) for name in _CARRIED})
            rec.update({"start_seq": start_seq, "reason": reason,
                        "stopped_after": stopped_after})
            self._append(rec)
        if self._in_flight:
            self._emit("requests.incomplete", level="warning", count=len(self._in_flight),
                       reason=reason, first_start_seq=min(self._in_flight),
                       hint="requests in flight when the daemon stopped were recorded as "
                            "incomplete; their clients received at most part of an answer")
        self._in_flight.clear()

    @property
    def in_flight(self) -> int:
        """How many started requests have no end recorded yet."""
        return len(self._in_flight)

    # --- time-driven work ----------------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        self._epoch_due = now + self.seal_interval if self._key is not None else float("inf")
        self._day_end = _next_midnight(self._file_start) if self.rotate_daily else float("inf")
        self._next_check = min(self._epoch_due, self._day_end)

    def _due(self, now: float) -> None:
        if now >= self._day_end:
            self._rotate(now, "day")
        elif now >= self._epoch_due:
            self._advance_epoch(now, "interval")
        else:
            self._next_check = min(self._epoch_due, self._day_end)

    def tick(self) -> None:
        """Do time-driven work now if due: day rotation, key evolution, retention.

        Called by `maintain` so the key evolves and the file rotates even with no traffic.
        """
        if self._fd is None:
            return
        now = self._clock()
        if now >= self._next_check:
            self._due(now)
        # Retention waits for files in the worker; it also runs now and then without rotations,
        # so files past max_age go even when traffic has stopped.
        if self._reap_compression() or now >= self._next_retention:
            self._apply_retention(now)

    def _advance_epoch(self, now: float, reason: str) -> None:
        """Announce the next epoch in a record sealed with the current key; evolve; erase."""
        if self._key is None or self._state is None:
            self._schedule(now)
            return
        assert self._epoch is not None
        self._write_marker("epoch", {"key_id": self._key_id, "next_epoch": self._epoch + 1,
                                     "reason": reason, "format": FORMAT,
                                     **self._carry(reason)}, now)
        # The marker must be durable before the state moves on: a state ahead of the log would
        # leave the marker's epoch unverifiable after a power loss.
        self.sync()
        self._state.advance(self._clock)
        sealing.write_state(self.state_dir, self._state)
        self._epoch = self._state.epoch
        self._schedule(now)

    def _rotate(self, now: float, reason: str) -> None:
        """Close the live file under its final name, start a new one with an epoch marker."""
        assert self._fd is not None and self._pool is not None
        if self.sync_mode == "always":
            # Waiters count on every record up to the synced seq being on disk, whichever file
            # holds it; with group commit little is unsynced, so this is short.
            self.sync()
        old_fd, dirty = self._fd, self._dirty
        self._fd = None
        rotated = self.logs_dir / rotated_name(self._file_start, self._file_first, self._seq)
        self._live.replace(rotated)
        _fsync_dir(self.logs_dir)
        # Flushing up to a whole file to disk can take 100 ms: the worker does it (and then
        # compresses), so the loop only pays for the rename and the new file's marker.
        self._compressing[rotated] = self._pool.submit(
            _finish_rotated, old_fd, dirty, rotated if self.compress else None, self._mode)
        self._emit("requests.rotated", file=rotated.name, first=self._file_first,
                   last=self._seq, reason=reason)
        self._fd = os.open(self._live, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                           | os.O_CLOEXEC, self._mode)
        self._size = 0
        self._file_first, self._file_start = self._seq + 1, now
        if self._key is None:
            # Every file starts with a marker, sealed or not, so each file names its lineage.
            self._write_marker("epoch", {"key_id": None, "next_epoch": None,
                                         "reason": "rotation", "format": FORMAT,
                                         **self._carry("rotation")}, now)
            self._schedule(now)
        else:
            self._advance_epoch(now, "rotation")
        self._apply_retention(now)

    def rotate(self) -> None:
        """Rotate now (operator request or tests)."""
        if self._fd is not None:
            self._rotate(self._clock(), "request")

    # --- compression and retention -------------------------------------------------------------

    def _submit_compression(self, path: Path) -> None:
        assert self._pool is not None
        self._compressing[path] = self._pool.submit(compress_file, path, self._mode)

    def _reap_compression(self) -> int:
        """Forget finished worker jobs, reporting failures; return how many finished."""
        finished = 0
        for path, fut in list(self._compressing.items()):
            if not fut.done():
                continue
            del self._compressing[path]
            finished += 1
            exc = fut.exception()
            if exc is not None:
                self._emit("requests.compress_failed", level="error", file=path.name,
                           error=str(exc), hint="the plain file is kept; it is retried at start")
        return finished

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the worker's pending fsyncs and compressions finish; False on timeout."""
        pending = list(self._compressing.values())
        _, not_done = concurrent.futures.wait(pending, timeout=timeout)
        return not not_done

    def _apply_retention(self, now: float) -> None:
        self._next_retention = now + RETENTION_CHECK_INTERVAL
        if not self.keep_files and not self.max_age and not self.max_total_bytes:
            return
        self._reap_compression()
        segments = list_segments(self.logs_dir)
        # The newest rotated file always stays: with it, the log can be continued and checked.
        excess = len(segments) - self.keep_files if self.keep_files else 0
        total = sum(size_of(seg.path) for seg in segments) if self.max_total_bytes else 0
        for i, seg in enumerate(segments[:-1]):
            nxt = segments[i + 1]
            too_many = i < excess
            too_old = bool(self.max_age) and now - nxt.start > self.max_age
            too_big = bool(self.max_total_bytes) and total > self.max_total_bytes
            # Only the oldest files go, in order: the ledger then describes one unbroken prefix.
            if not (too_many or too_old or too_big) or seg.path in self._compressing \
                    or nxt.path in self._compressing:
                break
            total -= size_of(seg.path)
            self._retire(seg, nxt, "keep_files" if too_many else "max_age" if too_old
                         else "max_total_bytes", now)

    def _retire(self, seg: Segment, nxt: Segment, reason: str, now: float) -> None:
        first = orjson.loads(first_line(nxt.path))
        entry = {"ts": self._ts.format(now), "file": seg.name, "first": seg.first,
                 "last": seg.last, "reason": reason, "next_prev": first.get("prev"),
                 "next_epoch": first.get("epoch"), "key_id": first.get("key_id")}
        # Ledger first, then unlink: a crash between leaves a listed file that still exists,
        # which the verifier accepts, never a missing file that nothing explains.
        ledger = self.logs_dir / LEDGER_NAME
        fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self._mode)
        try:
            os.write(fd, orjson.dumps(entry) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        for p in (seg.path, seg.path.with_name(seg.name.removesuffix(".gz")),
                  seg.path.with_name(seg.name.removesuffix(".gz") + ".gz")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._write_marker("retention", {"file": seg.name, "first": seg.first,
                                         "last": seg.last, "reason": reason}, now)
        self._emit("requests.retired", file=seg.name, first=seg.first, last=seg.last,
                   reason=reason)

    # --- durability, checkpoints, shutdown -----------------------------------------------------

    def _carry(self, reason: str) -> dict[str, Any]:
        """A new file's first marker lists the starts still open, so recovery reads one file."""
        if reason != "rotation":
            return {}
        return {"in_flight": [{"start_seq": k, **v} for k, v in sorted(self._in_flight.items())]}

    def sync(self) -> None:
        """fsync the live file if records were written since the last sync (blocking)."""
        if self._fd is not None and self._dirty:
            os.fsync(self._fd)
            self._dirty = False
            self._synced_seq = self._seq

    async def durable(self, seq: int) -> None:
        """Return once record `seq` is as durable as `requests.sync` promises.

        "always": after an fsync that began after the record was written; concurrent callers
        share one fsync in a worker thread (group commit). "interval" and "never": at once.
        Raises RequestLogError if the fsync fails.
        """
        if self.sync_mode != "always":
            return
        while self._synced_seq < seq:
            if self._flush is None:
                self._flush = asyncio.ensure_future(self._fsync_batch())
            await asyncio.shield(self._flush)

    async def flush(self) -> None:
        """fsync in the worker thread what was written since the last sync (`maintain`)."""
        if self._flush is None and self._dirty:
            self._flush = asyncio.ensure_future(self._fsync_batch())
        if self._flush is not None:
            await asyncio.shield(self._flush)

    async def _fsync_batch(self) -> None:
        try:
            if self._fd is None or self._sync_pool is None:
                raise RequestLogError("the request log is not open")
            upto = self._seq
            # A duplicate descriptor: a rotation may close the live one while this runs.
            fd = os.dup(self._fd)
            self._dirty = False
            try:
                await asyncio.get_running_loop().run_in_executor(self._sync_pool, os.fsync, fd)
            except OSError as exc:
                self._dirty = True
                raise RequestLogError(
                    f"{self._live}: cannot make request records durable (fsync: "
                    f"{exc.strerror or exc}); requests are not answered until they can be"
                ) from exc
            finally:
                os.close(fd)
            self._synced_seq = max(self._synced_seq, upto)
        finally:
            self._flush = None

    def checkpoint(self) -> Checkpoint:
        """The chain's head now: last sequence number, its line hash, the current epoch."""
        return Checkpoint(self._seq, self._head, self._epoch, self._last_ts)

    @property
    def seq(self) -> int:
        return self._seq

    def close(self) -> Checkpoint:
        """Wait for compression, apply retention, write the close marker; return the checkpoint.

        Requests still started but not ended (the gateway stopped before they finished) are
        recorded as incomplete with reason "daemon_stop".
        """
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._sync_pool is not None:
            self._sync_pool.shutdown(wait=True)
            self._sync_pool = None
        self._reap_compression()
        if self._fd is not None:
            now = self._clock()
            self._close_in_flight("daemon_stop", self._last_ts, now)
            self._apply_retention(now)
            self._write_marker("close", {}, now)
            self.sync()
            os.close(self._fd)
            self._fd = None
        if self._state is not None:
            self._state.erase()
        self._key = None
        return self.checkpoint()


async def maintain(log: RequestLog, emit: Emit, stop: asyncio.Event, *,
                   checkpoint_interval: float, tick_interval: float = 1.0) -> None:
    """Keep the request log's time-driven promises until `stop` is set.

    Every `tick_interval`: evolve the key / rotate by day if due. With `requests.sync:
    interval`, every `log.sync_interval`: fsync new records in the worker thread. Every
    `checkpoint_interval`: emit `requests.checkpoint` (seq, head, epoch) to the event log. The
    daemon starts this as a task after `log.open()` and calls `log.close()` after it returns.
    """
    loop = asyncio.get_running_loop()
    next_checkpoint = loop.time() + checkpoint_interval
    next_tick = loop.time() + tick_interval
    wake = min(tick_interval, log.sync_interval) if log.sync_mode == "interval" \
        else tick_interval
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=wake)
        try:
            if log.sync_mode == "interval":
                await log.flush()
            if loop.time() >= next_tick or stop.is_set():
                next_tick = loop.time() + tick_interval
                log.tick()
        except (OSError, RequestLogError) as exc:
            emit("requests.maintenance_failed", level="error", error=str(exc))
        if loop.time() >= next_checkpoint or stop.is_set():
            emit("requests.checkpoint", **log.checkpoint().fields())
            next_checkpoint = loop.time() + checkpoint_interval
