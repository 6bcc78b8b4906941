"""Per-key quotas: tokens and requests per UTC day and per UTC month, counted from the records.

What counts is what the request log says: a request counts once it was accepted for the server
(its record has a `start_seq`), and its tokens are the record's `prompt_tokens +
completion_tokens`. At start the daemon reads the current month's records again, so the counts
survive restarts and agree with what an auditor can add up from the log. A spent quota answers
429 with the time it resets (the next UTC midnight, or the first of the next month) in
`Retry-After` and in the message. Tokens are known only once a request ends, so requests in
flight when a token quota is reached may carry it past its limit by their own size (the same
holds for OpenAI's and LiteLLM's budgets); the request count is taken before the request goes
out and is never passed.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

LIMITS = ("tokens_per_day", "requests_per_day", "tokens_per_month", "requests_per_month")


@dataclass(frozen=True)
class Quota:
    """A key's limits; None means no limit."""

    tokens_per_day: int | None = None
    requests_per_day: int | None = None
    tokens_per_month: int | None = None
    requests_per_month: int | None = None

    def to_json(self) -> dict[str, int]:
        """The limits that are set (an unlimited key stores nothing)."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @property
    def unlimited(self) -> bool:
        return not self.to_json()

    def changed(self, changes: dict[str, int | None]) -> Quota:
        """A copy with `changes` applied (a None value removes that limit)."""
        return replace(self, **changes)

    def describe(self) -> str:
        """`tokens/day 1000, requests/month 50` or `-`."""
        return ", ".join(f"{k.replace('_per_', '/')} {v}" for k, v in self.to_json().items()) or "-"


def parse_quota(raw: object, where: str) -> Quota:
    """A keys-file `quota` object checked (absent or null: no limits); ValueError otherwise."""
    if raw is None:
        return Quota()
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: quota must be an object")
    extra = sorted(set(raw) - set(LIMITS))
    if extra:
        raise ValueError(f"{where}: unknown quota field(s) {', '.join(extra)}")
    for name, value in raw.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: quota {name} must be a whole number of at least 1")
    return Quota(**raw)


def window_end(period: str, now: float) -> float:
    """The POSIX time the current UTC `period` ("day" or "month") ends."""
    t = time.gmtime(now)
    if period == "day":
        return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400.0
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def month_start(now: float) -> float:
    """The POSIX time the current UTC month began."""
    t = time.gmtime(now)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))


def _keys(ts: str) -> tuple[str, str]:
    """("YYYY-MM-DD", "YYYY-MM") of an ISO-8601 UTC time."""
    return ts[:10], ts[:7]


@dataclass
class _Used:
    day: str = ""
    month: str = ""
    tokens_day: int = 0
    requests_day: int = 0
    tokens_month: int = 0
    requests_month: int = 0

    def roll(self, day: str, month: str) -> None:
        if month != self.month:
            self.month, self.tokens_month, self.requests_month = month, 0, 0
        if day != self.day:
            self.day, self.tokens_day, self.requests_day = day, 0, 0

    def value(self, limit: str) -> int:
        what, _, period = limit.partition("_per_")
        return int(getattr(self, f"{what}_{period}"))


@dataclass(frozen=True)
class Spent:
    """A quota that is used up: which, its limit, and when it resets (POSIX seconds)."""

    limit: str
    allowed: int
    resets: float


class QuotaBook:
    """Requests and tokens per client name in the current UTC day and month."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._used: dict[str, _Used] = {}

    def _now_keys(self) -> tuple[float, str, str]:
        now = self._clock()
        stamp = time.strftime("%Y-%m-%d", time.gmtime(now))
        return now, stamp, stamp[:7]

    def _of(self, client: str, day: str, month: str) -> _Used:
        used = self._used.get(client)
        if used is None:
            used = self._used[client] = _Used(day, month)
        used.roll(day, month)
        return used

    def load(self, records: Iterable[dict[str, Any]]) -> int:
        """Count request records (of this month, in order) again, as at start; returns how
        many counted."""
        _, today, this_month = self._now_keys()
        counted = 0
        for rec in records:
            client, ts = rec.get("client"), rec.get("ts")
            if not isinstance(client, str) or not isinstance(ts, str) or \
                    rec.get("start_seq") is None:
                continue
            day, month = _keys(ts)
            if month != this_month:
                continue
            used = self._used.setdefault(client, _Used(today, this_month))
            tokens = _tokens(rec)
            used.requests_month += 1
            used.tokens_month += tokens
            if day == today:
                used.requests_day += 1
                used.tokens_day += tokens
            counted += 1
        return counted

    def spent(self, client: str, quota: Quota) -> Spent | None:
        """The first of the client's limits that is used up, or None."""
        if quota.unlimited:
            return None
        now, day, month = self._now_keys()
        used = self._of(client, day, month)
        for limit, allowed in quota.to_json().items():
            if used.value(limit) >= allowed:
                return Spent(limit, allowed, window_end(limit.rpartition("_")[2], now))
        return None

    def count_request(self, client: str) -> None:
        """A request of `client` was accepted for the server."""
        _, day, month = self._now_keys()
        used = self._of(client, day, month)
        used.requests_day += 1
        used.requests_month += 1

    def count_tokens(self, client: str, rec: dict[str, Any]) -> None:
        """A request of `client` ended with the token counts of its record `rec`."""
        tokens = _tokens(rec)
        if tokens:
            _, day, month = self._now_keys()
            used = self._of(client, day, month)
            used.tokens_day += tokens
            used.tokens_month += tokens

    def usage(self, client: str) -> dict[str, int]:
        """{limit name: used so far in its window} for `client`."""
        _, day, month = self._now_keys()
        used = self._of(client, day, month)
        return {limit: used.value(limit) for limit in LIMITS}


def _tokens(rec: dict[str, Any]) -> int:
    total = 0
    for name in ("prompt_tokens", "completion_tokens"):
        value = rec.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            total += value
    return total


class QuotaCollector(Collector):
    """Prometheus view of the quotas: `sovereignd_client_quota_limit` and
    `sovereignd_client_quota_used` per client and limit, for the keys that have limits."""

    def __init__(self, book: QuotaBook, clients: Callable[[], Iterable[Any]]) -> None:
        self._book = book
        self._clients = clients

    def collect(self) -> Iterator[GaugeMetricFamily]:
        limit = GaugeMetricFamily("sovereignd_client_quota_limit",
                                  "A client key's quota (UTC day or month)", labels=["client",
                                                                                     "quota"])
        used = GaugeMetricFamily("sovereignd_client_quota_used",
                                 "What a client key used of its quota in the current window",
                                 labels=["client", "quota"])
        for client in self._clients():
            used_now = self._book.usage(client.name)
            for name, value in client.quota.to_json().items():
                limit.add_metric([client.name, name], value)
                used.add_metric([client.name, name], used_now[name])
        yield limit
        yield used
