"""Keep the served weights and software equal to their approved baselines while the daemon runs.

Each guard verifies fully before the first start (a supervisor gate), then watches its files
with watchdog (create, modify, delete, move, attribute change) and re-verifies the touched
files at once, runs a cheap stat check every few seconds for what events miss, and re-hashes
everything on a schedule at low priority. File-integrity tools scan daily (AIDE), every 12 h
(Wazuh) or per query interval (osquery); here a changed byte is found in seconds.

Drift of the weights (`integrity.on_drift`): `stop` quarantines (server stopped, /readyz 503,
no start until the files verify again or an operator accepts a new baseline) or `alert`.
Drift of the software (`environment.on_drift`): `block-restart` keeps serving the process
already loaded but refuses any new start, `stop` quarantines, `alert` logs.

A guard created for a start (an on_demand model's next start, or a second model on the same
venv) reuses a full verification that passed in this daemon when nothing under the verified
files changed since (integrity.reuse: every entry's inode, size, mtime and ctime, taken before
hashing); its event says so (`scope: reused`, `verified_at`, `verified_by`). Any change or
doubt → the full verification, as at the first start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from sovereignd.config import Config
from sovereignd.errors import SovereigndError
from sovereignd.integrity import environment, manifest, safetensors, signing, software
from sovereignd.integrity.frozen import FrozenRequirements, companion_path, read_frozen
from sovereignd.integrity.record import verify_records
from sovereignd.integrity.reuse import Fingerprint, Verifications, fingerprint
from sovereignd.integrity.venv import site_packages
from sovereignd.logs.eventlog import EventLog
from sovereignd.logs.files import utc_timestamp
from sovereignd.supervision.states import State
from sovereignd.supervision.supervisor import Blocked, Request, Supervisor

DEBOUNCE = 0.05   # gather a burst of events (a copy, a rename) into one re-verification
MAX_LISTED = 20   # files named in a reason or an event; the rest are counted
OVERFLOW_SETTLE = 1.0  # after a lost-events overflow, wait this long, then re-verify once

# Only changes: watchdog builds the inotify mask from this list (watchdog 7
# `InotifyEmitter.get_event_mask_from_filter`), so opens, reads and closes without a write
# (IN_OPEN, IN_ACCESS, IN_CLOSE_NOWRITE) are never queued by the kernel. Subscribing to them
# overflowed the queue on a real venv (35,000 files read by the server and by the RECORD
# check), and watchdog's re-walk after an overflow opened every folder again: a loop.
CHANGE_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileDeletedEvent, FileMovedEvent,
                 FileClosedEvent, DirCreatedEvent, DirDeletedEvent, DirMovedEvent]

# watchdog reports a kernel queue overflow only through this logger (watchdog 7.1
# `observers/inotify_c.py` `Inotify.handle_event`); its handlers get no event for it.
WATCHDOG_INOTIFY_LOGGER = "watchdog.observers.inotify_c"
OVERFLOW_MESSAGE = "Inotify queue overflowed"


class _Bridge(FileSystemEventHandler):
    """Hands watchdog's events (on its observer thread) to the asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 touched: Callable[[Iterable[str]], None]) -> None:
        self._loop = loop
        self._touched = touched

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads are not changes (the filter already keeps them out)
        paths = [event.src_path]
        dest = getattr(event, "dest_path", "")
        if dest:
            paths.append(dest)
        names = [p.decode() if isinstance(p, bytes) else str(p) for p in paths]
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(self._touched, names)


class _OverflowListener(logging.Handler):
    """Hears watchdog's "queue overflowed" report (on its observer thread) and hands it to
    the loop: events were lost, so the guard must re-verify everything once."""

    def __init__(self, loop: asyncio.AbstractEventLoop, overflowed: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self._loop = loop
        self._overflowed = overflowed

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith(OVERFLOW_MESSAGE):
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                self._loop.call_soon_threadsafe(self._overflowed)


class Guard:
    """What both guards share: the watch, the schedules, the drift state, the policy."""

    name = "guard"

    def __init__(self, cfg: Config, supervisor: Supervisor, events: EventLog) -> None:
        self.cfg = cfg
        self.supervisor = supervisor
        self.events = events
        self.status: dict[str, Any] = {"result": "not verified yet"}
        self.drift: dict[str, dict[str, Any]] = {}
        self.fault: str | None = None  # the baseline itself cannot be read
        self._touched: set[str] = set()
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._observer: Any = None
        self._overflow: _OverflowListener | None = None
        self._overflow_task: asyncio.Task[None] | None = None
        self.overflows = 0
        self._verified_once = False
        self._stamp: tuple[tuple[int, int, int, int] | None, ...] = ()
        self._faulted = asyncio.Event()  # set when the baseline becomes unreadable
        self._lock = asyncio.Lock()
        self._stop = threading.Event()
        # The daemon's passed full verifications, shared by every model's guards (None: none
        # is reused).
        self.verifications: Verifications | None = None
        supervisor.checks[self.name] = self.status

    # --- to be provided by each guard ----------------------------------------------------------

    @property
    def policy(self) -> str:
        raise NotImplementedError

    def watched(self) -> list[Path]:
        raise NotImplementedError

    def load(self) -> None:
        """Read the baseline (raises SovereigndError with an operator sentence)."""
        raise NotImplementedError

    def verify(self, paths: list[str] | None, low_priority: bool) -> dict[str, dict[str, Any]]:
        """Verify everything (paths None) or the touched paths; return drift per item, where
        an item that verifies is mapped to {} (blocking: runs in a thread)."""
        raise NotImplementedError

    def stat_changes(self) -> list[str]:
        """Paths whose cheap stat changed since the last look (blocking)."""
        return []

    def verified_fields(self) -> dict[str, Any]:
        return {}

    def reuse_key(self) -> tuple[Any, ...] | None:
        """What a passed full verification proves (the files, the baseline, the checks), to
        reuse it while nothing changed; None: never reused."""
        return None

    def reuse_roots(self) -> list[Path]:
        """The folders whose every entry the reuse fingerprint covers (blocking)."""
        return []

    def restore_verified(self, fields: dict[str, Any]) -> None:
        """Take the figures of a reused verification as this guard's own."""

    @property
    def interval(self) -> float:
        raise NotImplementedError

    def baseline_files(self) -> list[Path]:
        """The files the baseline is read from: a change to one of them is a reason to read
        the baseline again while it cannot be read (an operator restoring a signature)."""
        return []

    def _baseline_stamp(self) -> tuple[tuple[int, int, int, int] | None, ...]:
        """(inode, size, mtime ns, ctime ns) of each baseline file; None for a missing one."""
        stamps: list[tuple[int, int, int, int] | None] = []
        for path in self.baseline_files():
            try:
                st = path.stat()
            except OSError:
                stamps.append(None)
                continue
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(stamps)

    # --- life -----------------------------------------------------------------------------------

    async def gate(self) -> Blocked | None:
        """Before every start: the baseline readable and everything (first time) or what
        changed since verifying."""
        async with self._lock:
            if not self._verified_once:
                self._stamp = await asyncio.to_thread(self._baseline_stamp)
                try:
                    await asyncio.to_thread(self.load)
                except SovereigndError as exc:
                    self.fault = str(exc)
                    self._publish()
                    self.events.emit(f"{self.name}_baseline_unreadable", level="error",
                                     error=str(exc))
                    return Blocked(State.QUARANTINED, f"{self.name} baseline: {exc}",
                                   {"guard": self.name})
                self.fault = None
                if not await self._reuse():
                    await self._run_verify(None, low_priority=False, acting=False)
                self._verified_once = True
            else:
                changed = await asyncio.to_thread(self.stat_changes)
                if changed:
                    await self._run_verify(changed, low_priority=False, acting=False)
        return self._blocked()

    def _blocked(self) -> Blocked | None:
        if self.fault is not None:
            return Blocked(State.QUARANTINED, f"{self.name} baseline: {self.fault}",
                           {"guard": self.name})
        if not self.drift or self.policy == "alert":
            return None
        return Blocked(State.QUARANTINED, self.reason(), {"guard": self.name,
                                                          "files": self.listed()})

    def reason(self) -> str:
        items = sorted(self.drift, key=lambda k: (not k.startswith("package "), k))
        shown = ", ".join(f"{self.drift[k].get('status', 'CHANGED')} {k}"
                          for k in items[:3])
        more = f" and {len(items) - 3} more" if len(items) > 3 else ""
        return f"{self.what} differ from the approved baseline: {shown}{more}"

    what = "files"

    def listed(self) -> list[dict[str, Any]]:
        return [{"path": k, **v} for k, v in sorted(self.drift.items())][:MAX_LISTED]

    def start(self) -> None:
        """Start watching and the schedules (after the first gate ran)."""
        loop = asyncio.get_running_loop()
        if self._watch_enabled():
            self._observer = Observer()
            bridge = _Bridge(loop, self._on_touched)
            self._overflow = _OverflowListener(loop, self._on_overflow)
            logging.getLogger(WATCHDOG_INOTIFY_LOGGER).addHandler(self._overflow)
            for path in self.watched():
                try:
                    self._observer.schedule(bridge, str(path), recursive=True,
                                            event_filter=CHANGE_EVENTS)
                except OSError as exc:
                    self.events.emit(f"{self.name}_watch_failed", level="warning",
                                     path=str(path), error=str(exc),
                                     fallback="stat checks and scheduled re-hashes only")
            self._observer.daemon = True
            self._observer.start()
        self._tasks = [asyncio.create_task(self._worker(), name=f"{self.name}-worker"),
                       asyncio.create_task(self._stat_loop(), name=f"{self.name}-stat")]
        if self.interval > 0:
            self._tasks.append(asyncio.create_task(self._rehash_loop(),
                                                   name=f"{self.name}-rehash"))

    def _watch_enabled(self) -> bool:
        return True

    async def stop(self) -> None:
        self._stop.set()
        if self._overflow_task is not None:
            self._tasks.append(self._overflow_task)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._overflow is not None:
            logging.getLogger(WATCHDOG_INOTIFY_LOGGER).removeHandler(self._overflow)
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join, 5)

    def _on_overflow(self) -> None:
        """The kernel dropped events: schedule ONE full re-verification. Further overflows
        before it starts join it; its own reads raise no events (the filter), so it cannot
        cause another overflow."""
        self.overflows += 1
        if self._overflow_task is not None and not self._overflow_task.done():
            return
        self.events.emit(f"{self.name}_watch_overflow", level="warning",
                         overflows=self.overflows,
                         action=f"full re-verification in {OVERFLOW_SETTLE:g}s")
        self._overflow_task = asyncio.get_running_loop().create_task(
            self._reverify_after_overflow(), name=f"{self.name}-overflow")

    async def _reverify_after_overflow(self) -> None:
        await asyncio.sleep(OVERFLOW_SETTLE)  # one-shot delay, not a loop: let the burst end
        if self._verified_once and self.fault is None:
            async with self._lock:
                await self._run_verify(None, low_priority=True, acting=True)

    def _on_touched(self, paths: Iterable[str]) -> None:
        self._touched.update(paths)
        self._kick.set()

    async def _worker(self) -> None:
        while True:
            await self._kick.wait()
            await asyncio.sleep(DEBOUNCE)
            self._kick.clear()
            touched, self._touched = sorted(self._touched), set()
            if touched and self.fault is not None:
                await self._retry_if_baseline_changed()
            elif touched and self._verified_once:
                async with self._lock:
                    await self._run_verify(touched, low_priority=False, acting=True)

    async def _stat_loop(self) -> None:
        while True:
            # An unreadable baseline is looked at as often as the weights are stat-checked:
            # the operator restoring it should not wait for the (slower) software schedule.
            # A new fault wakes the wait so that the shorter interval applies at once.
            interval = (self.stat_interval if self.fault is None
                        else min(self.stat_interval, self.cfg.integrity.stat_interval))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._faulted.wait(), interval)
            self._faulted.clear()
            if self.fault is not None:
                await self._retry_if_baseline_changed()
                continue
            changed = await asyncio.to_thread(self.stat_changes)
            if changed:
                self._on_touched(changed)

    async def _retry_if_baseline_changed(self) -> None:
        if await asyncio.to_thread(self._baseline_stamp) != self._stamp:
            await self._retry_baseline()

    stat_interval = 10.0

    async def _rehash_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            async with self._lock:
                await self._run_verify(None, low_priority=True, acting=True)

    async def _reload(self) -> str | None:
        """Re-read the baseline (in a thread); the fault, published, if it cannot be read."""
        self._stamp = await asyncio.to_thread(self._baseline_stamp)
        try:
            await asyncio.to_thread(self.load)
        except SovereigndError as exc:
            self.fault = str(exc)
            self._publish()
            return self.fault
        self.fault = None
        return None

    async def _retry_baseline(self) -> None:
        """The baseline could not be read and one of its files changed since: read it again.
        Readable now (the operator restored or replaced it) → verify everything and, when the
        files match, release a quarantine this guard caused — as files that verify again do."""
        if self.fault is None:
            return
        if await self.recheck(reload=True, reloaded=self._report_baseline) and not self.drift \
                and self.supervisor.state is State.QUARANTINED:
            self.supervisor.request(Request.RELEASE, f"{self.name} baseline readable again "
                                    "and every file verifies", guard=self.name)

    def _report_baseline(self, fault: str | None) -> None:
        if fault is not None:
            self.events.emit(f"{self.name}_baseline_unreadable", level="error", error=fault)
        else:
            self.events.emit(f"{self.name}_baseline_readable", level="warning",
                             path=str(self.baseline_files()[0]), **self.baseline_fields())

    async def recheck(self, reload: bool = False,
                      reloaded: Callable[[str | None], None] | None = None) -> bool:
        """Verify everything now (an operator accepted a new baseline or asked, or a baseline
        that could not be read changed since). `reload`: read the baseline again first and
        tell `reloaded` the fault (None: readable). False when it cannot be read (nothing was
        verified), else True."""
        async with self._lock:
            if reload:
                fault = await self._reload()
                if reloaded is not None:
                    reloaded(fault)
                if fault is not None:
                    return False
            await self._run_verify(None, low_priority=False, acting=True)
            self._verified_once = True
            return True

    # --- results --------------------------------------------------------------------------------

    def _model(self) -> str:
        return next(iter(self.cfg.models), "")

    async def _reuse(self) -> bool:
        """Reuse a passed full verification of the same files against the same baseline if no
        entry under them changed since (see integrity.reuse); True when reused."""
        key, known = self.reuse_key(), None
        if key is not None and self.verifications is not None:
            t0 = time.monotonic()
            verifications = self.verifications
            known = await asyncio.to_thread(
                lambda: verifications.reusable(key, self.reuse_roots()))
        if known is None:
            return False
        self.drift = {}
        self.restore_verified(known.fields)
        at = utc_timestamp(known.at)
        self.status.update(last_check=utc_timestamp(time.time()), last_full=at, reused=at)
        self._publish()
        self.events.emit(f"{self.name}_verified", scope="reused",
                         seconds=round(time.monotonic() - t0, 3), verified_at=at,
                         verified_by=known.by, unchanged_entries=known.fingerprint.entries,
                         **{**self.verified_fields(), **self.baseline_fields()})
        return True

    def _fingerprint(self) -> Fingerprint | None:
        try:
            return fingerprint(self.reuse_roots())
        except OSError:
            return None  # not reusable: the next start verifies in full

    async def _run_verify(self, paths: list[str] | None, *, low_priority: bool,
                          acting: bool) -> None:
        t0 = time.monotonic()
        reuse = self.reuse_key() if self.verifications is not None else None
        # Taken BEFORE hashing: a file changed while it is hashed differs from it afterwards.
        fp = await asyncio.to_thread(self._fingerprint) if reuse and paths is None else None
        try:
            results = await asyncio.to_thread(self.verify, paths, low_priority)
        except SovereigndError as exc:
            results = {"(baseline)": {"status": "ERROR", "detail": str(exc)}}
        before = dict(self.drift)
        if paths is None:
            self.drift = {k: v for k, v in results.items() if v}
        else:
            for key, problem in results.items():
                if problem:
                    self.drift[key] = problem
                else:
                    self.drift.pop(key, None)
        scope = "full" if paths is None else "files"
        self.status["last_check"] = utc_timestamp(time.time())
        if paths is None:
            self.status["last_full"] = self.status["last_check"]
        self._publish()
        seconds = round(time.monotonic() - t0, 3)
        if reuse is not None and self.verifications is not None:
            if self.drift or results.get("(baseline)"):
                self.verifications.forget(reuse)
            elif fp is not None:
                self.verifications.record(reuse, fp, self._model(), self.verified_fields())
        if self.drift:
            if self.drift != before or not acting:
                self.events.emit(f"{self.name}_drift", level="error", scope=scope,
                                 files=self.listed(), count=len(self.drift), policy=self.policy,
                                 seconds=seconds, **self.baseline_fields())
        elif paths is None or before:
            self.events.emit(f"{self.name}_verified", scope=scope, seconds=seconds,
                             **{**self.verified_fields(), **self.baseline_fields()})
        if acting:
            self._act(before)

    def baseline_fields(self) -> dict[str, Any]:
        return {}

    def _act(self, before: dict[str, dict[str, Any]]) -> None:
        """Apply the policy to a change of the drift state while the server may be running."""
        sup = self.supervisor
        if self.drift and self.drift != before:
            if self.policy == "stop":
                sup.request(Request.QUARANTINE, self.reason(), guard=self.name,
                            files=self.listed())
            else:
                sup.set_degraded(self.name, self.reason()
                                 + (" — new starts are refused" if self.policy == "block-restart"
                                    else " — alert only, still serving"))
        elif not self.drift and before:
            sup.set_degraded(self.name, None)
            self.events.emit(f"{self.name}_restored", level="warning",
                             reason=f"{self.what} verify again")
            if sup.state is State.QUARANTINED:
                sup.request(Request.RELEASE, f"{self.what} verify again", guard=self.name)

    def _publish(self) -> None:
        s = self.status
        if self.fault is not None:
            self._faulted.set()
            s["result"] = "error"
            s["summary"] = f"baseline unreadable: {self.fault}"
        elif self.drift:
            s["result"] = "drift"
            s["summary"] = self.reason()
        else:
            s["result"] = "ok"
            s["summary"] = f"{self.what}: as approved (every file matches the baseline)"
        s["drift"] = self.listed()
        s["policy"] = self.policy
        s.update(self.verified_fields())
        s.update(self.baseline_fields())


class WeightsGuard(Guard):
    """The model directory against `integrity.manifest`, or against the file digests a
    verified `integrity.signature` signs."""

    name = "integrity"
    what = "weights"

    def __init__(self, cfg: Config, supervisor: Supervisor, events: EventLog) -> None:
        super().__init__(cfg, supervisor, events)
        self.signed: signing.SignedModel | None = None
        self.manifest: manifest.Manifest | None = None
        self.manifest_sha256: str | None = None
        self.snapshot: manifest.StatSnapshot = {}
        self.stat_interval = cfg.integrity.stat_interval
        self.files = 0
        self.bytes = 0

    @property
    def path(self) -> Path:
        path = self.cfg.integrity.manifest or self.cfg.integrity.signature
        assert path is not None
        return path

    def baseline_files(self) -> list[Path]:
        return [self.path]

    async def gate(self) -> Blocked | None:
        """Before every start, the signature is verified again (it may have been replaced or
        edited since); new signed digests are checked against every file at once."""
        if self.cfg.integrity.signature is not None and self._verified_once:
            async with self._lock:
                before = self.manifest_sha256
                fault = await self._reload()
                if fault is not None:
                    self.events.emit(f"{self.name}_baseline_unreadable", level="error",
                                     error=fault)
                    return self._blocked()
                if self.manifest_sha256 != before:
                    await self._run_verify(None, low_priority=False, acting=False)
        return await super().gate()

    def _ignored(self) -> list[Path]:
        return [] if self.signed is None else self.signed.ignored(self.cfg.server.model)

    @property
    def policy(self) -> str:
        return self.cfg.integrity.on_drift

    @property
    def interval(self) -> float:
        return self.cfg.integrity.rehash_interval

    def _watch_enabled(self) -> bool:
        return self.cfg.integrity.watch

    def watched(self) -> list[Path]:
        model = self.cfg.server.model
        roots = [model]
        repo = manifest.hf_cache_repo(model)
        if repo is not None:
            roots = [repo]  # snapshots link into blobs/: watch the whole cache repo
        return roots + [r for r in self.cfg.integrity.allowed_roots if r.is_dir()]

    def load(self) -> None:
        i = self.cfg.integrity
        if i.signature is not None:
            try:
                self.signed = signing.verify(i.signature, public_key=i.public_key,
                                             certificate_chain=i.certificate_chain)
            except signing.SignatureError as exc:
                self.events.emit("signature_verified", level="error", result="refused",
                                 signature=str(i.signature), error=str(exc))
                raise
            self.manifest = self.signed.manifest
            self.manifest_sha256 = self.signed.manifest.sha256
            self.events.emit("signature_verified", result="ok", files=len(self.manifest),
                             **self.signed.fields())
            return
        pin = self.cfg.integrity.manifest_sha256
        if pin is not None:
            self.manifest_sha256 = manifest.check_manifest_pin(self.path, pin)
        else:
            self.manifest_sha256 = manifest.file_sha256(self.path)
        self.manifest = manifest.read_manifest(self.path)

    def verify(self, paths: list[str] | None, low_priority: bool) -> dict[str, dict[str, Any]]:
        assert self.manifest is not None
        if paths is None:
            self.snapshot = manifest.stat_snapshot(self.cfg.server.model,
                                                   manifest_path=self.path,
                                                   ignore=self._ignored())
        report = manifest.verify_manifest(
            self.cfg.server.model, self.manifest, paths=paths, manifest_path=self.path,
            allowed_roots=self.cfg.integrity.allowed_roots,
            workers=self.cfg.integrity.hash_workers, low_priority=low_priority,
            stop=self._stop, ignore=self._ignored())
        if paths is not None:
            # Keep the stat baseline current for the files just verified.
            fresh = manifest.stat_snapshot(self.cfg.server.model, manifest_path=self.path,
                                           ignore=self._ignored())
            self.snapshot = fresh
        else:
            self.files = len(self.manifest.digests)
            self.bytes = report.bytes_hashed
        out: dict[str, dict[str, Any]] = {}
        if paths is not None:
            # A drifted file that is gone now (a removed extra file, a rename undone) yields
            # no result: what was drift under the re-checked paths and is not found again is
            # resolved.
            model = self.cfg.server.model
            rels = []
            for p in paths:
                with contextlib.suppress(ValueError):
                    rels.append(str(Path(p).relative_to(model)) if Path(p).is_absolute()
                                else p)
            for key in self.drift:
                if any(key == r or key.startswith(r.rstrip("/") + "/") or r == "."
                       for r in rels):
                    out[key] = {}
        links = set()
        if self.signed is not None and not self.signed.allow_symlinks:
            links = set(signing.symlinked(self.cfg.server.model,
                                          [r.path for r in report.results]))
        for r in report.results:
            if r.path in links:
                out[r.path] = {"status": str(manifest.Status.UNSAFE), "expected": r.expected,
                               "actual": r.actual, "detail": "a symlink, and the signature "
                               "was made without allow_symlinks"}
            elif r.status == manifest.Status.OK:
                out[r.path] = {}
            else:
                out[r.path] = {"status": str(r.status), "expected": r.expected,
                               "actual": r.actual, "detail": r.detail or None}
        return out

    def stat_changes(self) -> list[str]:
        if not self.snapshot:
            return []
        now = manifest.stat_snapshot(self.cfg.server.model, manifest_path=self.path,
                                     ignore=self._ignored())
        return [str(self.cfg.server.model / p) for p in manifest.changed_paths(self.snapshot,
                                                                               now)]

    def verified_fields(self) -> dict[str, Any]:
        return {"files": self.files, "bytes": self.bytes}

    def baseline_fields(self) -> dict[str, Any]:
        if self.signed is not None:
            return self.signed.fields()
        return {"manifest": str(self.path), "manifest_sha256": self.manifest_sha256}


class EnvironmentGuard(Guard):
    """The server venv against `environment.frozen` (and its files against their RECORD)."""

    name = "environment"
    what = "server software"

    def __init__(self, cfg: Config, supervisor: Supervisor, events: EventLog) -> None:
        super().__init__(cfg, supervisor, events)
        self.frozen: FrozenRequirements | None = None
        self.frozen_sha256: str | None = None
        self.packages = 0
        self.record_files = 0
        self.record_bytes = 0
        self.stat_interval = max(60.0, cfg.integrity.stat_interval)
        self.software: software.SoftwareManifest | None = None
        self.software_files = 0
        self.recompiled = 0

    @property
    def venv(self) -> Path:
        assert self.cfg.server.venv is not None
        return self.cfg.server.venv

    @property
    def path(self) -> Path:
        assert self.cfg.environment.frozen is not None
        return self.cfg.environment.frozen

    def baseline_files(self) -> list[Path]:
        return [self.path, companion_path(self.path)]

    @property
    def policy(self) -> str:
        return self.cfg.environment.on_drift

    @property
    def interval(self) -> float:
        return self.cfg.environment.interval

    def _watch_enabled(self) -> bool:
        return self.cfg.environment.watch

    def watched(self) -> list[Path]:
        if self.software is None:
            return site_packages(self.venv)
        return [Path(p) for p in self.software.roots() if Path(p).is_dir()]

    def load(self) -> None:
        self.frozen = read_frozen(self.path)
        self.frozen_sha256 = manifest.file_sha256(self.path)
        if self.cfg.environment.files_check:
            self.software = software.read_approved(self.path)

    def verify(self, paths: list[str] | None, low_priority: bool) -> dict[str, dict[str, Any]]:
        assert self.frozen is not None
        out: dict[str, dict[str, Any]] = {}
        diff = environment.compare(self.frozen, self.venv)
        for item in diff.added:
            out[f"package {item.name}"] = {"status": "ADDED", "installed": item.short()}
        for item in diff.removed:
            out[f"package {item.name}"] = {"status": "REMOVED", "frozen": item.short()}
        for old, new in diff.changed:
            out[f"package {old.name or new.name}"] = {"status": "CHANGED",
                                                      "frozen": old.short(),
                                                      "installed": new.short()}
        self.packages = len(self.frozen.requirements)
        # Packages are judged as a whole each time: clear earlier package verdicts.
        for key in list(self.drift):
            if key.startswith("package ") and key not in out:
                out[key] = {}
        if self.cfg.environment.record_check:
            report = verify_records(
                self.venv, paths=None if paths is None else [Path(p) for p in paths],
                workers=self.cfg.integrity.hash_workers, low_priority=low_priority,
                stop=self._stop)
            if paths is None:
                self.record_files, self.record_bytes = report.files_checked, report.bytes_hashed
            for status, issues in (("FAILED", report.mismatched), ("MISSING", report.missing),
                                   ("EXTRA", report.unrecorded)):
                for issue in issues:
                    out[f"file {issue.path}"] = {"status": status, "dist": issue.dist or None,
                                                 "expected": issue.expected,
                                                 "actual": issue.actual, "detail": issue.reason}
        if self.software is not None:
            files = software.verify(self.software, paths=paths,
                                    workers=self.cfg.integrity.hash_workers,
                                    low_priority=low_priority, stop=self._stop)
            if paths is None:
                self.software_files, self.recompiled = (files.files_checked,
                                                        len(files.recompiled))
            out.update(software.drift_entries(files))
        # Earlier file verdicts under the re-checked paths (all of them, when complete)
        # that are not found again have been repaired.
        for key in list(self.drift):
            if key.startswith("file ") and key not in out and (
                    paths is None or any(p.endswith(key[5:]) or key[5:].startswith(p)
                                         for p in paths)):
                out[key] = {}
        return out

    def verified_fields(self) -> dict[str, Any]:
        return {"packages": self.packages, "record_files": self.record_files,
                "record_bytes": self.record_bytes, "software_files": self.software_files,
                "bytecode_recompiled": self.recompiled}

    def baseline_fields(self) -> dict[str, Any]:
        return {"frozen": str(self.path), "frozen_sha256": self.frozen_sha256,
                **software.status_fields(self.software)}

    def reuse_key(self) -> tuple[Any, ...] | None:
        if self.frozen_sha256 is None:
            return None
        env = self.cfg.environment
        return (self.name, os.path.realpath(self.venv), str(self.path), self.frozen_sha256,
                env.record_check, env.files_check)

    def reuse_roots(self) -> list[Path]:
        # The venv the link names now (an upgrade's switch is a different key), and what the
        # software manifest covers beyond it (the interpreter's own files).
        return [Path(os.path.realpath(self.venv)), *self.watched()]

    def restore_verified(self, fields: dict[str, Any]) -> None:
        self.packages = int(fields.get("packages") or 0)
        self.record_files = int(fields.get("record_files") or 0)
        self.record_bytes = int(fields.get("record_bytes") or 0)
        self.software_files = int(fields.get("software_files") or 0)
        self.recompiled = int(fields.get("bytecode_recompiled") or 0)


def guards_for(cfg: Config, supervisor: Supervisor, events: EventLog,
               verifications: Verifications | None = None) -> list[Guard]:
    """The guards this configuration asks for (none when no baseline is configured); they
    reuse and record passed full verifications in `verifications` (one per daemon)."""
    guards: list[Guard] = []
    if cfg.integrity.manifest is not None or cfg.integrity.signature is not None:
        guards.append(WeightsGuard(cfg, supervisor, events))
    else:
        supervisor.checks["integrity"] = {"result": "disabled",
                                          "summary": "integrity.manifest is not set: the "
                                          "weights are not verified"}
        supervisor.add_gate(_safetensors_gate(cfg))
    if cfg.environment.frozen is not None and cfg.server.venv is not None:
        guards.append(EnvironmentGuard(cfg, supervisor, events))
    else:
        supervisor.checks["environment"] = {"result": "disabled",
                                            "summary": "environment.frozen is not set: the "
                                            "server software is not verified"}
    for guard in guards:
        guard.verifications = verifications
        supervisor.add_gate(guard.gate)
    return guards


def _safetensors_gate(cfg: Config) -> Callable[[], Any]:
    """Without a manifest, still refuse truncated or corrupt shards before a minute of
    loading (the header check reads a few kilobytes per file)."""

    async def gate() -> Blocked | None:
        model = cfg.server.model
        if not model.is_dir():
            return None
        files = {str(p.relative_to(model)): p for p in model.rglob("*.safetensors")}
        problems = await asyncio.to_thread(safetensors.check_safetensors_files, files)
        if not problems:
            return None
        first = next(iter(problems.values()))
        return Blocked(State.FATAL, f"corrupt weights: {first.reason}",
                       {"kind": "model-corrupt", "files": sorted(problems)})

    return gate


async def accept(guards: list[Guard], supervisor: Supervisor, events: EventLog,
                 reason: str) -> None:
    """An operator approved new baselines: re-read them, verify everything, and leave a
    quarantine if nothing drifts any more. Recorded as `baseline_accepted`."""
    fields: dict[str, Any] = {}
    for guard in guards:
        await guard.recheck(reload=True)
        fields.update({k: v for k, v in guard.baseline_fields().items()
                       if k in ("manifest_sha256", "frozen_sha256")})
    clean = all(not g.drift and g.fault is None for g in guards)
    events.emit("baseline_accepted", level="warning", reason=reason, clean=clean, **fields)
    if clean and supervisor.state is State.QUARANTINED:
        supervisor.request(Request.RELEASE, f"baseline accepted: {reason}")
