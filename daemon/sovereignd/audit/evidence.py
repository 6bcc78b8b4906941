"""Evidence for the audit: what the event log, the request log and the files say.

Reading only, no verdicts: the kept events up to the period's end, stretches spent in a
supervisor state, who may write a file, what a manifest or frozen file lists, and the request
records' counts, tokens, errors and latency. `audit` judges the controls from these.
"""

from __future__ import annotations

import datetime as dt
import functools
import grp
import hashlib
import math
import os
import pwd
import re
import time
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sovereignd.errors import SovereigndError
from sovereignd.integrity import manifest
from sovereignd.logs.files import rotated_files, utc_timestamp
from sovereignd.service import guardrails

UNAUTHENTICATED = "(not authenticated)"


class AuditError(SovereigndError):
    """The audit cannot be produced as asked (a bad date, an unreadable file)."""


@dataclass(frozen=True)
class Period:
    """The time the report covers: [since, until) in POSIX seconds; since None = the logs' start."""

    since: float | None
    until: float

    # Cached: `holds` runs once per event, and formatting a time is the costly part.
    @functools.cached_property
    def lo(self) -> str | None:
        return utc_timestamp(self.since) if self.since is not None else None

    @functools.cached_property
    def hi(self) -> str:
        return utc_timestamp(self.until)

    def holds(self, ts: object) -> bool:
        """True if the log timestamp `ts` lies in the period (ISO strings compare in time order)."""
        if not isinstance(ts, str):
            return False
        lo = self.lo
        return (lo is None or ts >= lo) and ts < self.hi


def parse_ts(ts: str) -> float:
    """POSIX seconds of a log timestamp (`2026-11-22T02:11:00.123Z`)."""
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def parse_date(text: str, option: str, end_of_day: bool = False) -> float:
    """POSIX seconds for an ISO date or date-time (UTC unless it names an offset).

    A bare date means the start of that day, or with `end_of_day` its end (so `--until
    2026-11-30` includes the 30th). Raises AuditError with the accepted forms.
    """
    raw = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw):
            day = dt.date.fromisoformat(raw)
            stamp = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
            if end_of_day:
                stamp += dt.timedelta(days=1)
            return stamp.timestamp()
        parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "T", 1))
    except ValueError as exc:
        raise AuditError(f"{option} {text!r} is not a date or time: use ISO 8601, e.g. "
                         "2026-11-22, 2026-11-22T14:00 or 2026-11-22T14:00:00Z (UTC unless "
                         "an offset such as +01:00 is given)") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


# ---------------------------------------------------------------------------------------------
# Reading the event log


@dataclass
class EventHistory:
    """Every kept event up to the period's end, oldest first, with what the files held."""

    events: list[dict[str, Any]]
    files: list[Path]
    malformed: int
    first_ts: str | None

    def named(self, *names: str) -> Iterator[dict[str, Any]]:
        wanted = set(names)
        return (e for e in self.events if e.get("event") in wanted)

    def in_period(self, period: Period, *names: str) -> list[dict[str, Any]]:
        return [e for e in self.named(*names) if period.holds(e.get("ts"))]

    def last(self, *names: str,
             where: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
        """The most recent event with one of `names` (and matching `where`)."""
        for e in self.events[::-1]:
            if e.get("event") not in names or (where is not None and not where(e)):
                continue
            return e
        return None


def read_events(logs_dir: Path, until: str) -> EventHistory:
    """Events of `events.log` and its rotations with `ts` before `until`."""
    files = rotated_files(logs_dir / "events.log")
    events: list[dict[str, Any]] = []
    malformed = 0
    first: str | None = None
    for path in files:
        try:
            f = path.open("rb")
        except FileNotFoundError:
            continue  # rotated away while listing
        except OSError as exc:
            raise AuditError(f"{path}: cannot read the event log: {exc.strerror or exc}") from exc
        with f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    ev = orjson.loads(line)
                except orjson.JSONDecodeError:
                    malformed += 1
                    continue
                ts = ev.get("ts") if isinstance(ev, dict) else None
                if not isinstance(ts, str):
                    malformed += 1
                    continue
                if first is None or ts < first:
                    first = ts
                if ts < until:
                    events.append(ev)
    return EventHistory(events, files, malformed, first)


@dataclass
class Interval:
    """A stretch of time in one supervisor state (FATAL, QUARANTINED)."""

    state: str
    start: str
    end: str | None     # None: still in that state when the logs end
    reason: str
    ended_by: str

    def seconds(self, until: float) -> float:
        end = parse_ts(self.end) if self.end is not None else min(until, time.time())
        return end - parse_ts(self.start)


def state_intervals(history: EventHistory, state: str) -> list[Interval]:
    """Every stretch spent in `state`: from the transition in, to the next transition out or
    the next daemon start (a daemon killed while parked left no transition out)."""
    out: list[Interval] = []
    current: dict[str, Any] | None = None
    for ev in history.events:
        name = ev.get("event")
        if current is not None:
            if name == "state" and ev.get("from") == state:
                out.append(Interval(state, current["ts"], ev["ts"], str(current.get("reason")),
                                    f"-> {ev.get('to')}: {ev.get('reason')}"))
                current = None
            elif name == "daemon_start":
                out.append(Interval(state, current["ts"], ev["ts"], str(current.get("reason")),
                                    "the daemon stopped without leaving the state (killed?)"))
                current = None
        if current is None and name == "state" and ev.get("to") == state:
            current = ev
    if current is not None:
        out.append(Interval(state, current["ts"], None, str(current.get("reason")),
                            "still in this state at the end of the period"))
    return out


def overlaps(iv: Interval, period: Period) -> bool:
    starts_before_end = iv.start < period.hi
    ends_after_start = iv.end is None or period.lo is None or iv.end >= period.lo
    return starts_before_end and ends_after_start


# ---------------------------------------------------------------------------------------------
# File facts


def account_of_uid(uid: int) -> guardrails.Account:
    """The account with this uid and its groups, as the guard rails judge it."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return guardrails.Account(f"uid {uid}", uid, frozenset())
    return guardrails.Account.named(name)


def account_label(account: guardrails.Account) -> str:
    """`_sovereignd (uid 998)`, or `uid 998` for an account this host does not know."""
    if account.name == f"uid {account.uid}":
        return account.name
    return f"{account.name} (uid {account.uid})"


def owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ManifestFacts:
    """What the weights manifest lists, and how much of it is on disk now."""

    sha256: str
    entries: int
    bytes_present: int
    missing: list[str]


def manifest_facts(path: Path, model_dir: Path) -> ManifestFacts:
    """Read the manifest as the daemon does (ManifestError if it would refuse it) and add up
    the sizes of the files it names, as they are now."""
    found = manifest.read_manifest(path)
    present = 0
    missing: list[str] = []
    for rel in found.digests:
        try:
            present += (model_dir / rel).stat().st_size
        except OSError:
            missing.append(rel)
    return ManifestFacts(found.sha256, len(found), present, missing)


# ---------------------------------------------------------------------------------------------
# Request statistics


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class _Tally:
    requests: int = 0
    errors: int = 0
    prompt: int = 0
    completion: int = 0
    # Doubles in an array, not Python floats: a month of records fits in a few MB per key.
    latencies: array[float] = field(default_factory=lambda: array("d"))

    def add(self, rec: dict[str, Any]) -> None:
        self.requests += 1
        status = rec.get("status")
        if isinstance(status, int) and status >= 400:
            self.errors += 1
        for attr, key in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
            n = rec.get(key)
            if isinstance(n, int) and not isinstance(n, bool):
                setattr(self, attr, getattr(self, attr) + n)
        latency = rec.get("latency_ms")
        if isinstance(latency, int | float) and not isinstance(latency, bool):
            self.latencies.append(float(latency))

    def to_json(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": round(self.errors / self.requests, 4) if self.requests else 0.0,
                "prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "latency_ms_p50": percentile(lat, 50), "latency_ms_p99": percentile(lat, 99)}


def request_stats(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts by client, model and day; tokens; error rates and classes; latency p50/p99."""
    total = _Tally()
    by_client: dict[str, _Tally] = defaultdict(_Tally)
    by_model: dict[str, _Tally] = defaultdict(_Tally)
    by_day: dict[str, _Tally] = defaultdict(_Tally)
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    first = last = None
    for rec in records:
        total.add(rec)
        by_client[str(rec.get("client") or UNAUTHENTICATED)].add(rec)
        by_model[str(rec.get("model") or "(none)")].add(rec)
        ts = str(rec.get("ts", ""))
        by_day[ts[:10]].add(rec)
        statuses[str(rec.get("status"))] += 1
        if rec.get("error"):
            errors[str(rec["error"])] += 1
        first = first or ts
        last = ts
    return {
        "total": total.to_json(),
        "first_ts": first, "last_ts": last,
        "by_client": {k: v.to_json() for k, v in sorted(by_client.items())},
        "by_model": {k: v.to_json() for k, v in sorted(by_model.items())},
        "by_day": {k: v.to_json() for k, v in sorted(by_day.items())},
        "by_status": dict(sorted(statuses.items())),
        "error_classes": dict(errors.most_common()),
    }
