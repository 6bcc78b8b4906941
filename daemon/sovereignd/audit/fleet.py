"""`sovereignd audit fleet`: one report for several hosts, from their `audit export` files.

For each export: its members are checked against the digests it lists; its request records'
chain, seals (with that host's verification key, which only the auditor holds) and checkpoints
are verified as `sovereignd logs verify` does, and the records' end is compared with the
exported sealing head (records cut off at the end). The report gives each host's controls (as
the host judged them when exporting, with the request-record controls judged again here), a
fleet summary (requests, models, clients, incidents per host) and every host or period that
could not be proven complete.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sovereignd import __version__
from sovereignd.audit import export as export_mod
from sovereignd.audit import render as render_mod
from sovereignd.audit.evidence import AuditError, read_events, request_stats
from sovereignd.logs.files import utc_timestamp
from sovereignd.logs.records import iter_records
from sovereignd.logs.verify import VerifyResult, verify_logs
from sovereignd.textsafe import escape

INCIDENT_STATES = ("BACKOFF", "FATAL", "QUARANTINED")
RECORD_CONTROLS = ("request_chain", "request_records")  # audit/controls/requests.py


@dataclass
class HostAudit:
    """One host's part of the fleet report."""

    name: str
    source: str
    exported_at: str
    period: dict[str, Any]
    config_sha256: str
    verdict: str                                   # the host's own report: PASS or FAIL
    controls: list[dict[str, Any]]
    chain: dict[str, Any]
    requests: dict[str, Any]
    incidents: dict[str, int]
    unproven: list[str] = field(default_factory=list)

    @property
    def proven(self) -> bool:
        return not self.unproven

    def to_json(self) -> dict[str, Any]:
        return {"host": self.name, "export": self.source, "exported_at": self.exported_at,
                "period": self.period, "config_sha256": self.config_sha256,
                "verdict": self.verdict, "proven_complete": self.proven,
                "not_proven": self.unproven, "controls": self.controls, "chain": self.chain,
                "requests": self.requests, "incidents": self.incidents}


@dataclass
class FleetReport:
    produced_at: str
    since: float | None
    until: float | None
    hosts: list[HostAudit]

    @property
    def failed(self) -> bool:
        return any(not h.proven or h.verdict == "FAIL" for h in self.hosts)

    def summary(self) -> str:
        unproven = [h.name for h in self.hosts if not h.proven]
        failing = [h.name for h in self.hosts if h.verdict == "FAIL"]
        return (f"{'FAIL' if self.failed else 'PASS'}: {len(self.hosts)} host(s); not proven "
                f"complete: {', '.join(unproven) or 'none'}; hosts with a failing control: "
                f"{', '.join(failing) or 'none'}")

    def to_json(self) -> dict[str, Any]:
        return {"schema": "sovereignd-fleet-audit/1", "produced_at": self.produced_at,
                "result": "FAIL" if self.failed else "PASS",
                "period": {"since": _ts(self.since), "until": _ts(self.until)},
                "summary": {h.name: {"requests": h.requests["total"]["requests"],
                                     "models": sorted(h.requests["by_model"]),
                                     "clients": sorted(h.requests["by_client"]),
                                     "incidents": h.incidents,
                                     "proven_complete": h.proven} for h in self.hosts},
                "not_proven": {h.name: h.unproven for h in self.hosts if h.unproven},
                "hosts": [h.to_json() for h in self.hosts]}


def _ts(value: float | None) -> str | None:
    return utc_timestamp(value) if value is not None else None


def _parse(text: str | None) -> float | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _head_problem(head: Any, result: VerifyResult) -> str | None:
    """Records cut off at the end: the sealing state had moved past the last record's epoch."""
    if not isinstance(head, dict):
        return None
    if "error" in head:
        return f"the host's sealing state could not be read: {head['error']}"
    if result.key_ids and head.get("key_id") == result.key_ids[-1] \
            and isinstance(head.get("epoch"), int) and result.last_epoch is not None \
            and head["epoch"] > result.last_epoch:
        return (f"the sealing state was at epoch {head['epoch']} when exported but the records "
                f"end in epoch {result.last_epoch}: later records were removed")
    return None


def _incidents(logs: Path, since: float | None, until: float) -> dict[str, int]:
    history = read_events(logs, utc_timestamp(until))
    lo = _ts(since) or ""
    counts = dict.fromkeys(INCIDENT_STATES, 0)
    for ev in history.events:
        if ev.get("event") == "state" and ev.get("to") in counts \
                and lo <= str(ev.get("ts", "")) < utc_timestamp(until):
            counts[str(ev["to"])] += 1
    return {k.lower(): v for k, v in counts.items()}


def audit_host(path: Path, keys_by_host: Mapping[str, Sequence[bytes]], since: float | None,
               until: float | None) -> HostAudit:
    """Unpack, check and verify one export; the host's part of the report."""
    with tempfile.TemporaryDirectory(prefix="sovereignd-fleet-") as tmp:
        root = Path(tmp)
        manifest = export_mod.unpack(path, root)
        host = manifest.get("host") or {}
        name = str(manifest.get("name") or host.get("hostname") or path.stem)
        own_keys = list(keys_by_host.get(name, ()) or keys_by_host.get(path.stem, ()))
        unproven = [f"archive: {p}" for p in export_mod.member_digest_problems(
            root, manifest.get("files") or {})]
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        result = verify_logs(logs, own_keys or None, None)
        if result.broken is not None:
            unproven.append(f"request records: {result.broken}")
        if not own_keys:
            unproven.append(f"seals not checked: no verification key given for {name} "
                            f"(--key-file {name}=FILE)")
        head = _head_problem(manifest.get("sealing_head"), result)
        if head:
            unproven.append(f"request records: {head}")
        for exposure in result.exposures:
            unproven.append(f"request records: an unclean stop at seq {exposure.get('seq')} "
                            f"({exposure.get('ts')}) after which an answered request may lack "
                            "its record")
        exported = manifest.get("period") or {}
        e_since, e_until = _parse(exported.get("since")), _parse(exported.get("until"))
        hi = until if until is not None else (e_until or 0.0)
        if e_until is not None and e_until < hi:
            unproven.append(f"period {_ts(e_until)} .. {_ts(hi)}: after the export was made")
        if since is not None and e_since is not None and e_since > since:
            unproven.append(f"period {_ts(since)} .. {_ts(e_since)}: before the exported period")
        if since is not None and result.first_ts is not None and result.removed_files \
                and result.first_ts > utc_timestamp(since):
            unproven.append(f"period {_ts(since)} .. {result.first_ts}: records removed by "
                            "retention")
        report = manifest.get("report") or {}
        controls = [{"id": c.get("id"), "title": c.get("title"), "verdict": c.get("verdict"),
                     "finding": c.get("finding")} for c in report.get("controls", [])
                    if isinstance(c, dict)]
        for c in controls:
            if c["id"] in RECORD_CONTROLS:  # judged again here, with the auditor's key
                c["verdict"] = "PASS" if result.ok and own_keys else (
                    "FAIL" if not result.ok else "WARN")
                c["finding"] = ("verified by the auditor: " + (
                    f"{result.records} records, seals checked" if result.ok and own_keys
                    else str(result.broken) if result.broken else "seals not checked"))
        verdict = "FAIL" if any(c["verdict"] == "FAIL" for c in controls) else "PASS"
        stats = request_stats(iter_records(logs, since, until))
        return HostAudit(name, str(path), str(manifest.get("exported_at")), exported,
                         str((manifest.get("config") or {}).get("sha256")), verdict, controls,
                         result.to_json(), stats, _incidents(logs, since, hi), unproven)


def audit_fleet(paths: Sequence[Path], keys_by_host: Mapping[str, Sequence[bytes]],
                since: float | None = None, until: float | None = None,
                now: float | None = None) -> FleetReport:
    """The fleet report over these exports. AuditError for an unreadable export or a key
    given for a host none of the exports is from."""
    if not paths:
        raise AuditError("give at least one export file")
    hosts = [audit_host(p, keys_by_host, since, until) for p in paths]
    names = {h.name for h in hosts} | {Path(h.source).stem for h in hosts}
    unknown = sorted(set(keys_by_host) - names)
    if unknown:
        raise AuditError(f"--key-file for {', '.join(unknown)}: no export is from that host "
                         f"(hosts: {', '.join(sorted(h.name for h in hosts))})")
    seen: dict[str, str] = {}
    for h in hosts:
        if h.name in seen:
            raise AuditError(f"{h.source} and {seen[h.name]} are both from {h.name}: give one "
                             "export per host")
        seen[h.name] = h.source
    return FleetReport(utc_timestamp(now) if now is not None else utc_timestamp(
        dt.datetime.now(dt.UTC).timestamp()), since, until, hosts)


def render_json(report: FleetReport) -> str:
    return orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2, default=str).decode() + "\n"


def render_markdown(report: FleetReport) -> str:
    """The fleet report for a ticket: summary table, what is not proven, each host's controls."""
    lines = ["# sovereignd fleet audit", "",
             f"Produced {report.produced_at}; period {_ts(report.since) or 'start of the logs'}"
             f" → {_ts(report.until) or 'the exports'}.", "", f"**{report.summary()}**", "",
             "## Fleet summary", "",
             "| host | requests | errors | models | clients | restarts | FATAL | quarantines "
             "| controls | proven complete |",
             "|---|---:|---:|---|---|---:|---:|---:|---|---|"]
    for h in report.hosts:
        total = h.requests["total"]
        lines.append(
            f"| {h.name} | {total['requests']} | {total.get('errors', 0)} | "
            f"{', '.join(sorted(h.requests['by_model'])) or '—'} | "
            f"{', '.join(sorted(h.requests['by_client'])) or '—'} | {h.incidents['backoff']} | "
            f"{h.incidents['fatal']} | {h.incidents['quarantined']} | {h.verdict} | "
            f"{'yes' if h.proven else '**no**'} |")
    lines += ["", "## Not proven complete", ""]
    unproven = [(h.name, p) for h in report.hosts for p in h.unproven]
    lines += [f"- **{name}**: {problem}" for name, problem in unproven] or \
        ["Every host's records are proven complete and unaltered for the period."]
    for h in report.hosts:
        lines += ["", f"## {h.name}", "",
                  f"Export {Path(h.source).name}, made {h.exported_at}; configuration sha256 "
                  f"`{h.config_sha256}`.", "", "| control | verdict | finding |",
                  "|---|---|---|"]
        lines += [f"| {_cell(c['title'])} | {c['verdict']} | {_cell(c['finding'])} |"
                  for c in h.controls]
    return "\n".join(escape(line) for line in lines) + "\n"


def _cell(value: Any) -> str:
    """A value inside a Markdown table cell: pipes and line breaks would end the cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_html(report: FleetReport) -> str:
    """The fleet report as one self-contained HTML page (templates/fleet.html.j2, with the
    single-host report's macros and style, autoescaped)."""
    summary = report.to_json()["summary"]
    rows = [[h.name, summary[h.name]["requests"], h.requests["total"].get("errors", 0),
             ", ".join(summary[h.name]["models"]) or "—",
             ", ".join(summary[h.name]["clients"]) or "—", h.incidents["backoff"],
             h.incidents["fatal"], h.incidents["quarantined"], h.verdict,
             "yes" if h.proven else "no"] for h in report.hosts]
    hosts = [{"name": h.name, "export": Path(h.source).name, "exported_at": h.exported_at,
              "config_sha256": h.config_sha256, "verdict": h.verdict, "proven": h.proven,
              "rows": [[c["title"], c["verdict"], c["finding"]] for c in h.controls]}
             for h in report.hosts]
    period = f"{_ts(report.since) or 'start of the logs'} → {_ts(report.until) or 'the exports'}"
    return render_mod.page(
        "fleet.html.j2", report=report, result="FAIL" if report.failed else "PASS",
        period=period, version=__version__, summary_rows=rows, hosts=hosts,
        summary=report.summary().partition(": ")[2],
        unproven=[(i, h.name, p) for i, h in enumerate(report.hosts, 1) for p in h.unproven])


def render(report: FleetReport, fmt: str) -> str:
    """The report in one of FORMATS."""
    return {"md": render_markdown, "html": render_html, "json": render_json}[fmt](report)
