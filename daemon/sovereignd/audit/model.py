"""The audit report's model: controls with their verdict, facts and tables."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sovereignd.audit.evidence import Period

PASS, FAIL, WARN, INFO = "PASS", "FAIL", "WARN", "INFO"
VERDICTS = (PASS, FAIL, WARN, INFO)
SCHEMA = "sovereignd.audit/1"


# ---------------------------------------------------------------------------------------------
# The report's model


@dataclass(frozen=True)
class Fact:
    """One piece of evidence: a stable key for tools, a label and value for people."""

    key: str
    label: str
    value: Any
    text: str | None = None  # how people read it, when not simply the value

    def display(self) -> str:
        if self.text is not None:
            return self.text
        return display_value(self.value)


@dataclass
class Table:
    """Evidence with rows: incidents, counts by client, files and their modes."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


@dataclass
class Control:
    """One control: its verdict, the sentence that explains it, and the evidence."""

    id: str
    section: str
    title: str
    verdict: str
    finding: str
    facts: list[Fact] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)

    def fact(self, key: str, label: str, value: Any, text: str | None = None) -> None:
        self.facts.append(Fact(key, label, value, text))

    def table(self, key: str, title: str, columns: list[str]) -> Table:
        t = Table(key, title, columns)
        self.tables.append(t)
        return t

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "section": self.section, "title": self.title,
                "verdict": self.verdict, "finding": self.finding,
                "evidence": {f.key: f.value for f in self.facts},
                "tables": {t.key: t.to_json() for t in self.tables}}


SECTIONS = ("Host and service", "Configuration", "Posture", "Model integrity",
            "Software environment", "Request records", "Incidents")


@dataclass
class AuditReport:
    """Everything the report says; rendered by `auditrender`, judged by `result`."""

    produced_at: str
    version: str
    period: Period
    period_start_text: str
    config_path: str
    config_sha256: str
    host: dict[str, Any]
    controls: list[Control]
    requests: dict[str, Any]
    incidents: dict[str, Any]
    charts: dict[str, list[tuple[str, int]]]

    @property
    def result(self) -> str:
        return FAIL if any(c.verdict == FAIL for c in self.controls) else PASS

    @property
    def failed(self) -> bool:
        return self.result == FAIL

    def counts(self) -> dict[str, int]:
        found = Counter(c.verdict for c in self.controls)
        return {v.lower(): found.get(v, 0) for v in VERDICTS}

    def control(self, control_id: str) -> Control:
        return next(c for c in self.controls if c.id == control_id)

    def summary(self) -> str:
        """`FAIL: 2 failed, 3 warnings, 9 passed, 2 for information`."""
        n = self.counts()
        return (f"{self.result}: {n['fail']} failed, {n['warn']} warning(s), {n['pass']} "
                f"passed, {n['info']} for information")

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "result": self.result, "counts": self.counts(),
            "produced_at": self.produced_at, "sovereignd_version": self.version,
            "period": {"since": self.period.lo, "until": self.period.hi,
                       "start": self.period_start_text},
            "config": {"path": self.config_path, "sha256": self.config_sha256},
            "host": self.host,
            "controls": [c.to_json() for c in self.controls],
            "requests": self.requests, "incidents": self.incidents,
            "charts": {k: [[day, n] for day, n in v] for k, v in self.charts.items()},
        }


# ---------------------------------------------------------------------------------------------
# Small formatting helpers (shared with the renderer)


_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def display_value(value: Any) -> str:
    """A value as people read it: timestamps to the second, lists joined, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, str):
        return short_ts(value) if _ISO.match(value) else value
    if isinstance(value, list | tuple):
        return ", ".join(display_value(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={display_value(v)}" for k, v in value.items()) or "none"
    return str(value)


def short_ts(ts: str) -> str:
    """`2026-11-22T02:11:00.123Z` -> `2026-11-22 02:11:00Z`."""
    return ts[:10] + " " + ts[11:19] + "Z" if _ISO.match(ts) else ts


def human_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h {minutes} min"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {sec} s"

