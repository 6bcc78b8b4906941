"""`sovereignd audit`: the auditor's question answered for a period, one control at a time.

Which model and which software served which requests for whom, did anything drift or fail,
and can the records be proved complete? `build_report` reads the configuration, the files it
names, the event log, the request log (verified whole with `logverify`) and the host, and
returns an `AuditReport`: one PASS / FAIL / WARN / INFO verdict per control with the evidence
under it. `auditrender` turns it into Markdown, HTML or JSON; `cli` decides the exit status.

Verdicts: PASS the control holds; FAIL it does not (the report's result is FAIL); WARN it
could not be fully judged or needs a person's look; INFO facts without a verdict.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovereignd import __version__
from sovereignd.audit.evidence import (
    UNAUTHENTICATED,
    AuditError,
    EventHistory,
    Interval,
    ManifestFacts,
    Period,
    account_label,
    account_of_uid,
    manifest_facts,
    overlaps,
    owner,
    read_events,
    request_stats,
    state_intervals,
)
from sovereignd.config import Config, is_loopback
from sovereignd.errors import FrozenFileError, ManifestError, SovereigndError
from sovereignd.gateway import keys as keys_mod
from sovereignd.integrity import hashing, software
from sovereignd.integrity.frozen import check_companion, parse_frozen
from sovereignd.logs import sealing, verify
from sovereignd.logs.files import utc_timestamp
from sovereignd.logs.records import iter_records
from sovereignd.service import guardrails, hostfacts
from sovereignd.units import format_size

PASS, FAIL, WARN, INFO = "PASS", "FAIL", "WARN", "INFO"
VERDICTS = (PASS, FAIL, WARN, INFO)
SCHEMA = "sovereignd.audit/1"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# Environment variable names whose values are secrets: shown only as fingerprints.
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
# Bars in a chart: beyond this many days the chart shows the most recent ones.
MAX_CHART_DAYS = 366


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


def human_size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


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


def _fingerprint(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]





# ---------------------------------------------------------------------------------------------
# Building the report


@dataclass
class _Inputs:
    """What every control reads, gathered once."""

    cfg: Config
    period: Period
    history: EventHistory
    probe: hostfacts.HostProbe
    keys: list[bytes]
    launch: hostfacts.Launch
    account: guardrails.Account | None
    account_source: str
    uids: list[int]


def build_report(cfg: Config, since: float | None = None, until: float | None = None, *,
                 verification_keys: Iterable[bytes] = (),
                 probe: hostfacts.HostProbe | None = None,
                 now: float | None = None) -> AuditReport:
    """Gather the evidence for the period and judge every control."""
    produced = time.time() if now is None else now
    end = produced if until is None else until
    if since is not None and since >= end:
        raise AuditError(f"the period is empty: --since ({utc_timestamp(since)}) is not before "
                         f"--until ({utc_timestamp(end)})")
    period = Period(since, end)
    probe = probe or hostfacts.HostProbe()
    history = read_events(cfg.logs.dir, period.hi)
    uids = _daemon_uids(history, period)
    account, source = _service_account(cfg, uids)
    inputs = _Inputs(cfg, period, history, probe, list(verification_keys),
                     hostfacts.launch_method(probe), account, source, uids)
    host = hostfacts.identity(probe)
    stats = request_stats(iter_records(cfg.logs.dir, period.since, period.until))
    chain = verify.verify_logs(cfg.logs.dir, inputs.keys or None, cfg.state_dir)
    incidents = _incident_data(inputs)
    controls = [
        _host_control(inputs, host),
        _account_control(inputs),
        _launch_control(inputs),
        _config_control(inputs),
        _listen_control(inputs),
        _offline_control(inputs),
        _secrets_control(inputs),
        _posture_control(inputs),
        _egress_control(inputs),
        _integrity_control(inputs, incidents),
        _environment_control(inputs),
        _self_control(inputs),
        _chain_control(inputs, chain),
        _records_control(inputs, chain),
        _activity_control(inputs, stats),
        _coverage_control(inputs),
        _incidents_control(inputs, incidents),
        _changes_control(inputs, incidents),
    ]
    charts = {
        "requests_per_day": _daily(period, {d: t["requests"] for d, t in
                                            stats["by_day"].items()}),
        "restarts_per_day": _daily(period, Counter(r["ts"][:10] for r in
                                                   incidents["restarts"])),
    }
    incidents = public_incidents(incidents)
    start_text = (period.lo if period.lo is not None else
                  f"start of the kept logs ({short_ts(history.first_ts or '') or 'none'})")
    return AuditReport(
        produced_at=utc_timestamp(produced), version=__version__, period=period,
        period_start_text=start_text, config_path=str(cfg.source), config_sha256=cfg.digest,
        host=host, controls=controls, requests=stats, incidents=incidents, charts=charts)


def _daily(period: Period, counts: dict[str, int]) -> list[tuple[str, int]]:
    """One bar per day of the period (days without data at zero), at most MAX_CHART_DAYS."""
    last = dt.datetime.fromtimestamp(period.until - 0.001, tz=dt.UTC).date()
    if period.since is not None:
        first = dt.datetime.fromtimestamp(period.since, tz=dt.UTC).date()
    elif counts:
        first = dt.date.fromisoformat(min(counts))
    else:
        first = last
    first = max(first, last - dt.timedelta(days=MAX_CHART_DAYS - 1))
    days = []
    day = first
    while day <= last:
        days.append((day.isoformat(), int(counts.get(day.isoformat(), 0))))
        day += dt.timedelta(days=1)
    return days


def _daemon_uids(history: EventHistory, period: Period) -> list[int]:
    """Accounts the daemon ran as in the period (the run in progress at its start counts)."""
    starts = [e for e in history.named("daemon_start") if isinstance(e.get("uid"), int)]
    inside = [e for e in starts if period.holds(e.get("ts"))]
    before = [e for e in starts if period.lo is not None and e["ts"] < period.lo]
    chosen = ([before[-1]] if before else []) + inside
    return sorted({int(e["uid"]) for e in chosen})


def _service_account(cfg: Config, uids: list[int]) -> tuple[guardrails.Account | None, str]:
    if cfg.daemon.user is not None:
        with contextlib.suppress(SovereigndError):  # no such account here: fall back to uids
            return guardrails.Account.named(cfg.daemon.user), "daemon.user"
    if uids:
        return account_of_uid(uids[-1]), "the uid in the daemon_start events"
    return None, "unknown"


# --- host and service --------------------------------------------------------------------------


def _host_control(i: _Inputs, host: dict[str, Any]) -> Control:
    c = Control("host", SECTIONS[0], "Host", INFO,
                f"{host['hostname']}: {host['os']}, {host['cpu_model'] or 'CPU model unknown'}, "
                f"{human_size(host['memory_bytes']) if host['memory_bytes'] else '?'} memory")
    c.fact("hostname", "Hostname", host["hostname"])
    c.fact("os", "Operating system", host["os"])
    c.fact("kernel", "Kernel", host["kernel"])
    c.fact("cpu_model", "Chip / CPU", host["cpu_model"])
    c.fact("cpu_count", "CPU cores", host["cpu_count"])
    c.fact("memory_bytes", "Memory", host["memory_bytes"],
           human_size(host["memory_bytes"]) if host["memory_bytes"] else None)
    c.fact("machine", "Architecture", host["machine"])
    c.fact("python", "Python (of this command)", host["python"])
    c.fact("sovereignd_version", "sovereignd version (of this command)", __version__)
    ran = sorted({str(e.get("version")) for e in i.history.in_period(i.period, "daemon_start")})
    c.fact("daemon_versions", "sovereignd versions that ran in the period", ran)
    if ran and ran != [__version__]:
        c.finding += f"; the daemon ran as version(s) {', '.join(ran)} in the period"
    return c


def _account_control(i: _Inputs) -> Control:
    c = Control("service_account", SECTIONS[0], "Service account", PASS, "")
    expected = i.cfg.daemon.user
    c.fact("configured_user", "daemon.user", expected,
           None if expected else "not set (the account is not checked at start)")
    ran = [account_of_uid(u) for u in i.uids]
    c.fact("daemon_uids", "The daemon ran as (daemon_start events)", [a.uid for a in ran],
           ", ".join(account_label(a) for a in ran) or "no daemon start recorded")
    if not ran:
        c.verdict = WARN
        c.finding = "no daemon start is recorded in the period or before it: the account it " \
                    "ran as cannot be told"
    elif any(a.uid == 0 for a in ran):
        c.verdict = FAIL
        c.finding = ("the daemon ran as root (uid 0); a production daemon runs as its own "
                     "unprivileged account (set daemon.user and start it as that account)")
    elif expected is not None and any(a.name != expected for a in ran):
        c.verdict = FAIL
        c.finding = (f"the daemon ran as {', '.join(account_label(a) for a in ran)}, not as the "
                     f"configured account {expected}")
    elif expected is None:
        c.verdict = WARN
        c.finding = (f"ran as {', '.join(account_label(a) for a in ran)}; daemon.user is not "
                     "set, so the account is not checked at start")
    else:
        c.finding = f"ran as {expected}, the configured service account"
    return c


def _launch_control(i: _Inputs) -> Control:
    launch = i.launch
    c = Control("launch", SECTIONS[0], "How it is launched", WARN, launch.detail)
    c.fact("manager", "Service manager", launch.manager)
    c.fact("definition", "Definition", str(launch.definition) if launch.definition else None)
    c.fact("loaded", "Loaded / active", launch.loaded,
           {True: "yes", False: "no", None: "cannot be asked here"}[launch.loaded])
    c.fact("state", "State", launch.state)
    c.fact("definition_user", "Account in the definition", launch.user)
    if launch.manager == "unknown":
        c.finding = launch.detail
        return c
    what = f"{launch.manager} ({launch.definition})"
    if launch.loaded:
        c.verdict = PASS
        c.finding = f"started by {what}, {launch.state}"
    elif launch.loaded is False:
        c.finding = f"{what} is installed but not active ({launch.state})"
    else:
        c.finding = f"{what} is installed; {launch.detail}"
    expected = i.cfg.daemon.user
    if launch.user is not None and expected is not None and launch.user != expected:
        c.verdict = FAIL
        c.finding += f"; the definition runs it as {launch.user}, not {expected}"
    elif launch.user is None and c.verdict == PASS:
        c.verdict = WARN
        c.finding += "; the definition names no account, so it runs as root"
    return c


# --- configuration ----------------------------------------------------------------------------


def _config_control(i: _Inputs) -> Control:
    cfg = i.cfg
    c = Control("config", SECTIONS[1], "Configuration file", PASS,
                f"{cfg.source}, sha256 {cfg.digest[:16]}…")
    c.fact("path", "Path", str(cfg.source))
    c.fact("sha256", "SHA-256 (now)", cfg.digest)
    c.fact("model", "Model served", f"{cfg.model_name} <- {cfg.server.model}")
    c.fact("server_command", "Server command", " ".join(cfg.server.command))
    seen: dict[str, str] = {}
    for e in i.history.in_period(i.period, "daemon_start"):
        digest = e.get("config_sha256")
        if isinstance(digest, str):
            seen.setdefault(digest, e["ts"])
    t = c.table("runs", "Configuration of each daemon start in the period",
                ["first started", "config sha256", "same as now"])
    for digest, ts in seen.items():
        t.rows.append([ts, digest, digest == cfg.digest])
    other = [d for d in seen if d != cfg.digest]
    if other:
        c.verdict = WARN
        c.finding = (f"the configuration changed during the period: {len(other)} other "
                     f"version(s) ran ({', '.join(d[:16] + '…' for d in other)})")
    spawns = i.history.in_period(i.period, "spawn")
    if spawns:
        c.fact("last_argv", "Last server command line (as logged, redacted)",
               spawns[-1].get("argv"), " ".join(map(str, spawns[-1].get("argv") or [])))
    return c


def _listen_control(i: _Inputs) -> Control:
    cfg = i.cfg
    host, _port = cfg.listen
    s = cfg.server
    uds = cfg.server_uds
    server_at = f"unix:{uds}" if uds else f"{s.host}:{s.port}"
    c = Control("listen", SECTIONS[1], "Listen addresses", PASS,
                f"gateway {cfg.gateway.listen} and server {server_at} are loopback only")
    c.fact("gateway", "Gateway (the only door)", cfg.gateway.listen)
    c.fact("gateway_loopback", "Gateway on loopback", is_loopback(host))
    c.fact("server", "Model server", server_at)
    c.fact("server_loopback", "Server on loopback or a socket",
           uds is not None or is_loopback(s.host))
    c.fact("tls", "TLS", cfg.gateway.tls_cert is not None,
           f"certificate {cfg.gateway.tls_cert}" if cfg.gateway.tls_cert else "no (loopback)")
    problems = []
    if not is_loopback(host):
        problems.append(f"the gateway listens on {host}, reachable from the network"
                        + (" with TLS" if cfg.gateway.tls_cert else " WITHOUT TLS"))
    if uds is None and not is_loopback(s.host):
        problems.append(f"the model server listens on {s.host}: its unguarded routes "
                        "(/invocations, /tokenize) are reachable without the gateway")
    if problems:
        remote_server = uds is None and not is_loopback(s.host)
        c.verdict = FAIL if remote_server or not cfg.gateway.tls_cert else WARN
        c.finding = "; ".join(problems)
    return c


def _offline_control(i: _Inputs) -> Control:
    env = i.cfg.server.env
    overridden = {k: env[k] for k in OFFLINE_VARS if k in env and env[k] not in ("1", "true")}
    c = Control("offline", SECTIONS[1], "Offline mode of the server", PASS, "")
    c.fact("required", "Required variables", list(OFFLINE_VARS),
           " ".join(f"{k}=1" for k in OFFLINE_VARS))
    spawns = i.history.in_period(i.period, "spawn")
    missing = [(e["ts"], [k for k in OFFLINE_VARS if k not in (e.get("env") or [])])
               for e in spawns]
    missing = [(ts, m) for ts, m in missing if m]
    c.fact("spawns", "Server starts in the period", len(spawns))
    c.fact("spawns_listing_all", "Starts whose logged environment names all three",
           len(spawns) - len(missing))
    if overridden:
        c.verdict = FAIL
        c.finding = ("server.env overrides the offline switches ("
                     + ", ".join(f"{k}={v}" for k, v in overridden.items())
                     + "): the server may fetch from a hub")
    elif not spawns:
        c.verdict = INFO
        c.finding = ("no server start in the period; the daemon sets "
                     + ", ".join(OFFLINE_VARS) + " to 1 at every start")
    elif missing:
        c.verdict = WARN
        c.finding = (f"{len(missing)} start(s) did not list every offline variable among the "
                     "variables the daemon added (they came from the daemon's own "
                     "environment, which the daemon overrides with 1)")
    else:
        c.finding = (f"all {len(spawns)} server start(s) in the period had "
                     + ", ".join(OFFLINE_VARS) + " set by the daemon")
    return c


def _secrets_control(i: _Inputs) -> Control:
    cfg = i.cfg
    c = Control("secrets", SECTIONS[1], "Secrets (fingerprints only)", PASS,
                "no secret is written in the configuration; keys are stored as hashes")
    secret_env = {k: v for k, v in cfg.server.env.items() if _SECRET_NAME.search(k)}
    t = c.table("server_env", "server.env (secret-looking values as fingerprints)",
                ["name", "value"])
    for k, v in sorted(cfg.server.env.items()):
        t.rows.append([k, _fingerprint(v) if k in secret_env else v])
    try:
        entries = keys_mod.read_keys(cfg.gateway.keys_file)
    except keys_mod.KeysFileError as exc:
        c.verdict = FAIL
        c.finding = str(exc)
        entries = []
    kt = c.table("client_keys", "Client keys (hashes stored; fingerprints shown)",
                 ["name", "role", "fingerprint", "created", "revoked"])
    for e in entries:
        kt.rows.append([e.name, e.role, e.fingerprint, e.created, e.revoked])
    c.fact("internal_key", "Server's internal key",
           "fresh per start, passed in the environment, never logged")
    try:
        state = sealing.read_state(cfg.state_dir)
    except sealing.SealStateError as exc:
        state = None
        c.fact("sealing_key", "Request-log sealing key", None, f"unreadable: {exc}")
    else:
        c.fact("sealing_key_id", "Request-log sealing key id",
               state.key_id if state else None,
               f"{state.key_id} (epoch {state.epoch})" if state else "none on this machine")
        if state is not None:
            state.erase()
    if cfg.gateway.tls_key is not None:
        c.fact("tls_key", "TLS private key", str(cfg.gateway.tls_key))
    if secret_env and c.verdict == PASS:
        c.verdict = WARN
        c.finding = (f"server.env holds {len(secret_env)} secret-looking value(s) "
                     f"({', '.join(sorted(secret_env))}) in clear in the configuration file; "
                     "shown here only as fingerprints")
    return c


# --- posture ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """A file or folder shown with its owner and mode, and what it must not be."""

    what: str
    path: Path | None
    kind: str           # "protected" (guards decide), "logs", "folder", "secret"
    required: bool = True


def _posture_items(cfg: Config) -> list[_Item]:
    named = {what: path for what, path in guardrails.protected_paths(cfg)}
    items = [_Item(what, path, "protected", required=what != "keys file")
             for what, path in named.items()]
    if cfg.integrity.manifest is None and cfg.integrity.signature is None:
        items.append(_Item("integrity manifest", None, "protected"))
    if cfg.environment.frozen is None:
        items.append(_Item("frozen environment", None, "protected"))
    items.append(_Item("logs folder", cfg.logs.dir, "logs"))
    if cfg.state_dir != cfg.logs.dir:
        items.append(_Item("state folder", cfg.state_dir, "folder"))
    items.append(_Item("sealing state", sealing.state_path(cfg.state_dir), "secret",
                       required=False))
    if cfg.gateway.tls_key is not None:
        items.append(_Item("TLS key", cfg.gateway.tls_key, "secret"))
    return items


def _judge_item(item: _Item, st: os.stat_result,
                problems: dict[str, guardrails.Problem]) -> tuple[str, str]:
    assert item.path is not None
    mode = stat.S_IMODE(st.st_mode)
    if item.kind == "protected":
        found = problems.pop(str(item.path), None)
        if found is not None:
            return FAIL, f"{found.message} — fix: {found.fix}"
        return PASS, "the service account cannot change it"
    if item.kind == "secret":
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            return FAIL, "readable by others than its owner: it holds a secret key"
        return PASS, "owner only"
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        return FAIL, "writable by every account"
    if item.kind == "logs" and mode & 0o007:
        return FAIL, ("open to every account: its files can hold prompt content (the daemon "
                      "refuses to start so) — fix: chmod o-rwx " + str(item.path))
    if mode & stat.S_IROTH:
        return WARN, "readable by every account"
    return PASS, "not open to other accounts"


def _posture_control(i: _Inputs) -> Control:
    """Owners and modes, judged by the daemon's own guard rails for the service account."""
    c = Control("file_posture", SECTIONS[2], "File owners and modes", PASS, "")
    t = c.table("files", "Files and folders", ["what", "path", "owner", "mode", "verdict",
                                                "why"])
    account = i.account
    if account is None:
        # Unknown account: judged as for root, i.e. whether any other account could change them.
        account = guardrails.Account("an unknown account", 0, frozenset())
        c.fact("service_account", "Judged for", None, "an unknown service account (no "
               "daemon.user, no daemon start recorded): whether any other account could "
               "change the files")
    else:
        c.fact("service_account", "Judged for", account.uid,
               f"{account_label(account)} (from {i.account_source})")
    problems = {p.path: p for p in guardrails.check_protected(i.cfg, account)}
    worst = PASS
    for item in _posture_items(i.cfg):
        if item.path is None:
            t.rows.append([item.what, None, None, None, WARN, "not configured"])
            worst = _worse(worst, WARN)
            continue
        try:
            st = item.path.stat()
        except FileNotFoundError:
            verdict = FAIL if item.required else WARN
            t.rows.append([item.what, str(item.path), None, None, verdict, "does not exist"])
            worst = _worse(worst, verdict)
            continue
        except OSError as exc:
            t.rows.append([item.what, str(item.path), None, None, WARN,
                           f"cannot be read: {exc.strerror or exc}"])
            worst = _worse(worst, WARN)
            continue
        verdict, why = _judge_item(item, st, problems)
        worst = _worse(worst, verdict)
        t.rows.append([item.what, str(item.path), owner(st), f"{stat.S_IMODE(st.st_mode):04o}",
                       verdict, why])
    # What is left are folders above the protected files (or their symlink targets).
    for path, p in problems.items():
        try:
            st = Path(path).stat()
        except OSError:
            continue
        t.rows.append(["folder above a protected file", path, owner(st),
                       f"{stat.S_IMODE(st.st_mode):04o}", FAIL, f"{p.message} — fix: {p.fix}"])
        worst = FAIL
    c.verdict = worst
    bad = [r for r in t.rows if r[4] in (FAIL, WARN)]
    c.finding = ("owners and modes as they should be: the service account cannot change what "
                 "approves its model, software and clients" if not bad else
                 "; ".join(f"{r[0]}: {str(r[5]).split(' — fix:')[0]}" for r in bad))
    return c


def _worse(a: str, b: str) -> str:
    order = {INFO: 0, PASS: 1, WARN: 2, FAIL: 3}
    return a if order[a] >= order[b] else b


def _egress_control(i: _Inputs) -> Control:
    uid = i.account.uid if i.account else None
    name = i.account.name if i.account else None
    found = hostfacts.egress(i.probe, i.launch, uid, name)
    c = Control("egress", SECTIONS[2], "Egress blocking", PASS, "")
    c.fact("checked", "Sources read", found.checked)
    c.fact("blocking", "Blocking rules found", found.blocking)
    if found.unreadable:
        c.fact("unreadable", "Sources present but not readable", found.unreadable)
    if found.blocked:
        c.finding = f"outbound traffic of the service is blocked: {found.blocking[0]}"
    elif found.checked:
        c.verdict = FAIL
        c.finding = ("no rule blocks the service's outbound traffic in "
                     + ", ".join(found.checked))
    else:
        c.verdict = WARN
        where = ("no pf anchor for sovereignd could be read" if i.probe.system == "Darwin"
                 else "no systemd unit, nft or iptables rules could be read")
        c.finding = (f"cannot be checked here: {where}"
                     + (f" ({'; '.join(found.unreadable)})" if found.unreadable else ""))
    return c


# --- model integrity and software environment -------------------------------------------------


def _integrity_control(i: _Inputs, incidents: dict[str, Any]) -> Control:
    cfg = i.cfg
    c = Control("integrity", SECTIONS[3], "Model weights against the manifest", PASS, "")
    manifest = cfg.integrity.manifest
    c.fact("on_drift", "Policy on drift (integrity.on_drift)", cfg.integrity.on_drift)
    problems: list[tuple[str, str]] = []
    if manifest is None and cfg.integrity.signature is not None:
        return _signed_control(c, i, incidents)
    if manifest is None:
        c.verdict = FAIL
        c.finding = ("integrity.manifest is not set: the weights are not verified against an "
                     "approved manifest")
        return c
    c.fact("manifest", "Manifest", str(manifest))
    facts: ManifestFacts | None = None
    try:
        facts = manifest_facts(manifest, cfg.server.model)
    except ManifestError as exc:
        problems.append((FAIL, str(exc)))
    if facts is not None:
        c.fact("manifest_sha256", "Manifest SHA-256 (now)", facts.sha256)
        c.fact("files", "Files listed", facts.entries)
        c.fact("bytes", "Bytes covered (sizes now)", facts.bytes_present,
               f"{human_size(facts.bytes_present)} ({facts.bytes_present:,} bytes)")
        if facts.missing:
            c.fact("missing_now", "Listed files missing now", facts.missing[:20])
        pinned = cfg.integrity.manifest_sha256
        if pinned is not None and pinned != facts.sha256:
            problems.append((FAIL, f"the manifest's SHA-256 is {facts.sha256[:16]}…, not the "
                             f"{pinned[:16]}… pinned in integrity.manifest_sha256"))
    full = i.history.last("integrity_verified", where=lambda e: e.get("scope") == "full")
    if full is None:
        problems.append((FAIL, "no full verification of the weights is recorded"))
    else:
        c.fact("last_full_verification", "Last full verification", full["ts"],
               f"{short_ts(full['ts'])}: OK, {full.get('files')} files, "
               f"{human_size(int(full.get('bytes') or 0))} in {full.get('seconds')} s")
    last = _last_check(c, i, "integrity", problems, "the weights differ from the manifest")
    known = last.get("manifest_sha256") if last is not None else None
    if facts is not None and isinstance(known, str) and known != facts.sha256:
        problems.append((WARN, "the manifest file changed after the daemon last used it"))
    drifts, q = _drift_tables(c, i, incidents, problems)
    accepted = i.history.in_period(i.period, "baseline_accepted")
    if accepted:
        b = c.table("baselines", "Baselines accepted by an operator",
                    ["time", "manifest sha256", "reason"])
        b.rows.extend([e["ts"], e.get("manifest_sha256"), e.get("reason")] for e in accepted)
    return _conclude(c, problems, lambda: (
        f"weights verified against the manifest ({facts.entries if facts else '?'} files, "
        f"{human_size(facts.bytes_present) if facts else '?'}); {len(drifts)} drift(s) and "
        f"{len(q.rows)} quarantine(s) in the period"))


def _drift_tables(c: Control, i: _Inputs, incidents: dict[str, Any],
                  problems: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], Table]:
    """The weights' drifts and quarantines of the period as tables; a drift served under
    policy alert is a failure. Returns the drift events and the quarantine table."""
    drifts = i.history.in_period(i.period, "integrity_drift")
    t = c.table("drifts", "Drift detected in the period", ["time", "policy", "files"])
    for d in drifts:
        files = d.get("files") or []
        t.rows.append([d["ts"], d.get("policy"),
                       "; ".join(f"{f.get('path')} {f.get('status')}" for f in files
                                 if isinstance(f, dict))])
        if d.get("policy") == "alert":
            problems.append((FAIL, f"drift at {short_ts(d['ts'])} under policy alert: the "
                             "drifted weights kept being served"))
    q = c.table("quarantines", "Quarantines in the period",
                ["start", "end", "duration", "reason"])
    q.rows.extend(incidents["_quarantine_rows"])
    return drifts, q


def _signed_control(c: Control, i: _Inputs, incidents: dict[str, Any]) -> Control:
    """The weights approved by an OpenSSF Model Signing signature: which signature and which
    signer approved the weights that served in the period, and every verification result."""
    cfg = i.cfg
    sig = cfg.integrity.signature
    assert sig is not None
    c.title = "Model weights against their signature"
    problems: list[tuple[str, str]] = []
    c.fact("signature", "Signature (integrity.signature)", str(sig))
    if cfg.integrity.public_key is not None:
        c.fact("public_key", "Signer's public key (integrity.public_key)",
               str(cfg.integrity.public_key))
    else:
        c.fact("certificate_chain", "Certificate chain (integrity.certificate_chain)",
               [str(p) for p in cfg.integrity.certificate_chain])
    try:
        now = hashing.hash_file(sig)
        c.fact("signature_sha256", "Signature SHA-256 (now)", now)
    except OSError as exc:
        now = None
        problems.append((FAIL, f"the signature cannot be read now: {exc.strerror or exc}"))
    results = i.history.in_period(i.period, "signature_verified")
    t = c.table("signature_checks", "Signature verifications in the period",
                ["time", "result", "signer", "signature sha256", "error"])
    t.rows.extend([e["ts"], e.get("result"), e.get("signer"), e.get("signature_sha256"),
                   e.get("error")] for e in results)
    approved = [e for e in results if e.get("result") == "ok"]
    a = c.table("approvals", "Signatures and signers that approved the weights served",
                ["signer", "signature sha256", "first", "last", "verifications"])
    seen: dict[tuple[str, str], list[str]] = {}
    for e in approved:
        seen.setdefault((str(e.get("signer")), str(e.get("signature_sha256"))), []).append(
            e["ts"])
    a.rows.extend([signer, digest, ts[0], ts[-1], len(ts)]
                  for (signer, digest), ts in seen.items())
    last_ok = i.history.last("signature_verified", where=lambda e: e.get("result") == "ok")
    if last_ok is None:
        problems.append((FAIL, "no verified signature is recorded: the weights were never "
                         "approved by their signature"))
    elif now is not None and last_ok.get("signature_sha256") != now:
        problems.append((WARN, "the signature file changed after the daemon last verified it"))
    full = i.history.last("integrity_verified", where=lambda e: e.get("scope") == "full")
    if full is None:
        problems.append((FAIL, "no full verification of the weights is recorded"))
    _last_check(c, i, "integrity", problems, "the weights differ from their signature")
    drifts, q = _drift_tables(c, i, incidents, problems)
    refused = len(results) - len(approved)
    return _conclude(c, problems, lambda: (
        f"weights approved by {len(seen)} signature/signer pair(s) "
        f"({', '.join(sorted({k[0] for k in seen})) or 'none in the period'}); "
        f"{len(approved)} verification(s) passed, {refused} refused; {len(drifts)} drift(s) "
        f"and {len(q.rows)} quarantine(s) in the period"))


def _last_check(c: Control, i: _Inputs, guard: str, problems: list[tuple[str, str]],
                drifted: str) -> dict[str, Any] | None:
    """The guard's most recent verdict (verified, drift, or a baseline it could not read),
    as a fact; a drift or an unreadable baseline not verified since is a failure."""
    last = i.history.last(f"{guard}_verified", f"{guard}_drift", f"{guard}_baseline_unreadable")
    if last is None:
        return None
    kind = str(last["event"]).removeprefix(f"{guard}_")
    result = {"verified": "verified", "drift": "DRIFT",
              "baseline_unreadable": "baseline unreadable"}[kind]
    c.fact("last_check", "Last check", f"{result} at {last['ts']}",
           f"{result} at {short_ts(last['ts'])} ({last.get('scope') or 'start'})")
    if kind == "drift":
        problems.append((FAIL, f"{drifted} since {short_ts(last['ts'])} and were not "
                         "verified again"))
    elif kind == "baseline_unreadable":
        problems.append((FAIL, f"at {short_ts(last['ts'])} the daemon could not read the "
                         f"baseline ({last.get('error')}) and it was not verified since"))
    return last


def _conclude(c: Control, problems: list[tuple[str, str]], ok: Any) -> Control:
    if not problems:
        c.finding = ok()
        return c
    fails = [p for v, p in problems if v == FAIL]
    c.verdict = FAIL if fails else WARN
    c.finding = "; ".join(fails or [p for _, p in problems])
    return c


def _environment_control(i: _Inputs) -> Control:
    cfg = i.cfg
    env = cfg.environment
    c = Control("environment", SECTIONS[4], "Server software against the frozen requirements",
                PASS, "")
    c.fact("on_drift", "Policy on drift (environment.on_drift)", env.on_drift)
    c.fact("record_check", "Installed files checked against RECORD", env.record_check)
    c.fact("venv", "Server venv", str(cfg.server.venv) if cfg.server.venv else None)
    if env.frozen is None:
        c.verdict = FAIL
        c.finding = ("environment.frozen is not set: the server's software is not verified "
                     "against approved requirements")
        return c
    problems: list[tuple[str, str]] = []
    c.fact("frozen", "Frozen requirements", str(env.frozen))
    digest: str | None = None
    try:
        data = env.frozen.read_bytes()
    except OSError as exc:
        problems.append((FAIL, f"{env.frozen}: cannot be read: {exc.strerror or exc}"))
    else:
        digest = hashlib.sha256(data).hexdigest()
        c.fact("frozen_sha256", "Frozen file SHA-256 (now)", digest)
        # The daemon's own readers: what they refuse at start, the audit fails.
        try:
            frozen = parse_frozen(data, str(env.frozen))
            c.fact("packages", "Packages listed", len(frozen.requirements))
            check_companion(env.frozen, data)
        except FrozenFileError as exc:
            c.fact("companion_matches", "Approved by its .sha256 companion", False)
            problems.append((FAIL, str(exc)))
        else:
            c.fact("companion_matches", "Approved by its .sha256 companion", True)
    if not env.record_check:
        problems.append((WARN, "environment.record_check is off: installed files are not "
                         "checked against their RECORD hashes"))
    _approved_software(c, problems, env.files_check,
                       lambda: software.read_approved(env.frozen) if env.frozen else None)
    last_ok = i.history.last("environment_verified")
    if last_ok is None:
        problems.append((FAIL, "no verification of the server's software is recorded"))
    else:
        c.fact("last_verification", "Last verification", last_ok["ts"],
               f"{short_ts(last_ok['ts'])}: OK, {last_ok.get('packages')} packages, "
               f"{last_ok.get('record_files')} installed files "
               f"({human_size(int(last_ok.get('record_bytes') or 0))}) match RECORD"
               + (f"; {last_ok.get('software_files')} files of the venv and its interpreter "
                  "match the software manifest" if last_ok.get("software_files") else ""))
        known = last_ok.get("frozen_sha256")
        if digest is not None and isinstance(known, str) and known != digest:
            problems.append((WARN, "the frozen file changed after the daemon last verified"))
    _last_check(c, i, "environment", problems,
                "the server's software differs from the frozen requirements")
    t = c.table("drifts", "Drift detected in the period",
                ["time", "policy", "added", "removed", "changed", "RECORD mismatches"])
    drifts = i.history.in_period(i.period, "environment_drift")
    for d in drifts:
        t.rows.append([d["ts"], d.get("policy"), *_software_drift(d)])
        if d.get("policy") == "alert":
            problems.append((FAIL, f"drift at {short_ts(d['ts'])} under policy alert: the "
                             "server kept running drifted software"))
    return _conclude(c, problems, lambda: (
        f"software verified at {short_ts(last_ok['ts']) if last_ok else '?'}; "
        f"{len(drifts)} drift(s) in the period"))


def _approved_software(c: Control, problems: list[tuple[str, str]], enabled: bool,
                       read: Callable[[], software.SoftwareManifest | None]) -> None:
    """Facts of an approved software manifest (files, interpreter); what the daemon's reader
    refuses, the audit fails."""
    c.fact("files_check", "Every file of the venv and its interpreter hashed", enabled)
    if not enabled:
        problems.append((WARN, "environment.files_check is off: bytecode, scripts, files no "
                         "RECORD lists and the interpreter are not verified"))
        return
    try:
        m = read()
    except SovereigndError as exc:
        problems.append((FAIL, str(exc)))
        return
    if m is None:
        return
    c.fact("software_manifest", "Software manifest", m.source)
    c.fact("software_manifest_sha256", "Software manifest SHA-256", m.sha256)
    c.fact("software_files", "Files approved (venv, interpreter, standard library)",
           len(m.digests))
    c.fact("interpreter", "Approved interpreter", m.interpreter.summary())


def _self_control(i: _Inputs) -> Control:
    """The daemon's own venv and interpreter (daemon.software_manifest)."""
    path = i.cfg.daemon.software_manifest
    c = Control("daemon_software", SECTIONS[4], "The daemon's own software", PASS, "")
    c.fact("software_manifest", "Software manifest (daemon.software_manifest)",
           str(path) if path else None)
    if path is None:
        c.verdict = WARN
        c.finding = ("daemon.software_manifest is not set: the daemon does not verify its own "
                     "venv and interpreter, so the gateway's code is not shown to be approved")
        return c
    problems: list[tuple[str, str]] = []
    _approved_software(c, problems, True, lambda: software.read_with_companion(path))
    last_ok = i.history.last("self_verified")
    if last_ok is None:
        problems.append((FAIL, "no verification of the daemon's own software is recorded"))
    else:
        c.fact("last_verification", "Last verification", last_ok["ts"],
               f"{short_ts(last_ok['ts'])}: OK, {last_ok.get('files')} files match")
    _last_check(c, i, "self", problems, "the daemon's own software differs from its manifest")
    t = c.table("drifts", "Drift detected in the period", ["time", "files"])
    drifts = i.history.in_period(i.period, "self_drift")
    for d in drifts:
        t.rows.append([d["ts"], _software_drift(d)[3]])
        problems.append((FAIL, f"the daemon's own software drifted at {short_ts(d['ts'])}"))
    return _conclude(c, problems, lambda: (
        f"the daemon's own software verified at {short_ts(last_ok['ts']) if last_ok else '?'}"))


def _software_drift(event: dict[str, Any]) -> list[str]:
    """Added, removed, changed packages and RECORD mismatches of an environment_drift event.

    The daemon lists them as `files`: {"path": "package vllm" | "file vllm/x.py", "status"};
    separate lists (added, removed, changed, record_mismatches) are read too."""
    if not isinstance(event.get("files"), list):
        return [_names(event.get(k)) for k in ("added", "removed", "changed",
                                               "record_mismatches")]
    groups: dict[str, list[str]] = {"ADDED": [], "REMOVED": [], "CHANGED": [], "file": []}
    for item in event["files"]:
        if not isinstance(item, dict):
            continue
        path, status = str(item.get("path", "")), str(item.get("status", ""))
        if path.startswith("package "):
            name = path.removeprefix("package ")
            shown = item.get("installed") or item.get("frozen") or name
            if status == "CHANGED":
                shown = f"{item.get('frozen')} -> {item.get('installed')}"
            groups.setdefault(status, []).append(str(shown))
        else:
            groups["file"].append(f"{path.removeprefix('file ')} {status}".strip())
    cells = [_names(groups[k]) for k in ("ADDED", "REMOVED", "CHANGED", "file")]
    count, listed = event.get("count"), sum(len(v) for v in groups.values())
    if isinstance(count, int) and count > listed:
        # The daemon names the first few; the rest are only counted.
        cells[3] = f"{'' if cells[3] == '—' else cells[3] + '; '}{count - listed} more not named"
    return cells


def _names(value: Any) -> str:
    """Drift lists hold names, `name==ver` strings or objects; shown compactly."""
    if not value:
        return "—"
    if isinstance(value, dict):
        value = [f"{k} {v}" for k, v in value.items()]
    if not isinstance(value, list):
        return str(value)
    out = []
    for item in value[:10]:
        if isinstance(item, dict):
            out.append(str(item.get("name") or item.get("path") or item.get("file") or item))
        else:
            out.append(str(item))
    more = f" (+{len(value) - 10})" if len(value) > 10 else ""
    return ", ".join(out) + more


# --- request records --------------------------------------------------------------------------


def _chain_control(i: _Inputs, result: verify.VerifyResult) -> Control:
    c = Control("request_chain", SECTIONS[5], "Request records complete and unaltered", PASS,
                "")
    c.fact("result", "Verification", "OK" if result.ok else "BROKEN")
    c.fact("seals_checked", "Seals checked with the auditor's key", result.seals_checked)
    c.fact("files", "Files", result.files)
    c.fact("records", "Records (requests)", result.records,
           f"{result.records:,} ({result.requests:,} requests)")
    c.fact("seq_range", "Sequence numbers", [result.first_seq, result.last_seq],
           f"{result.first_seq}..{result.last_seq}" if result.records else "none")
    c.fact("time_range", "Time range", [result.first_ts, result.last_ts],
           f"{short_ts(result.first_ts or '')} .. {short_ts(result.last_ts or '')}"
           if result.records else "none")
    c.fact("key_ids", "Sealing key id(s)", result.key_ids)
    c.fact("epoch_changes", "Key evolutions", result.epoch_changes)
    c.fact("checkpoints_checked", "Event-log checkpoints matched", result.checkpoints_checked)
    c.fact("writer_starts", "Writer starts (unclean)", [result.restarts,
                                                        len(result.unclean_restarts)],
           f"{result.restarts} ({len(result.unclean_restarts)} unclean)")
    c.fact("removed_files", "Files removed by retention (ledger)", result.removed_files)
    c.fact("closed", "Ends with a clean close", result.closed)
    if result.notes:
        c.fact("notes", "Notes", result.notes)
    if result.broken is not None:
        b = result.broken
        c.fact("break", "First break", b.to_json(), str(b))
        c.verdict = FAIL
        where = f"{b.file}, seq {b.seq}" if b.seq is not None else b.file
        c.finding = f"BROKEN — {b.kind} at {where}: {b.message}"
    elif not result.seals_checked:
        c.verdict = WARN
        c.finding = (f"the hash chain of {result.records:,} records in {result.files} file(s) "
                     "is intact, but the seals were NOT checked (no --key-file with the "
                     "auditor's verification key): whoever can write the files could have "
                     "rebuilt the chain")
    else:
        c.finding = (f"{result.records:,} records in {result.files} file(s), seq "
                     f"{result.first_seq}..{result.last_seq}: chain and seals verified with "
                     "the auditor's key")
    return c


# What each requests.sync setting means for a power loss (or a kernel crash).
SYNC_MEANING = {
    "always": "every record is on disk before its answer ends: a power loss loses no record "
              "of an answered request",
    "interval": "records reach the disk every {ms} ms: a power loss can lose the records of "
                "answers given in the last {ms} ms (a daemon crash loses none)",
    "never": "the operating system decides when records reach the disk (Linux: within ~30 s): "
             "a power loss can lose the records of answers given in that time (a daemon crash "
             "loses none)",
}


def _records_control(i: _Inputs, result: verify.VerifyResult) -> Control:
    """Every accepted request accounted for; FAIL if an answered request could lack a record."""
    c = Control("request_records", SECTIONS[5], "Every answered request has a record", PASS, "")
    period = i.period
    # The runs in force during the period: those that started in it and the one before it.
    runs = [r for r in result.runs if isinstance(r.get("ts"), str) and r["ts"] < period.hi]
    in_period = [r for r in runs if period.lo is None or r["ts"] >= period.lo]
    before = [r for r in runs if r not in in_period][-1:]
    settings: dict[str, str] = {}
    for r in before + in_period:
        sync = r.get("sync")
        if isinstance(sync, str):
            key = sync if sync != "interval" else f"interval {r.get('sync_interval_ms')} ms"
            settings[key] = SYNC_MEANING[sync].format(ms=r.get("sync_interval_ms"))
    configured = i.cfg.requests.sync
    c.fact("sync", "requests.sync in force (per daemon start)", list(settings) or None,
           "; ".join(f"{k}: {v}" for k, v in settings.items()) or "not recorded (older logs)")
    c.fact("sync_configured", "requests.sync configured now", configured,
           f"{configured}: " + SYNC_MEANING[configured].format(
               ms=round(i.cfg.requests.sync_interval * 1000, 3)))
    c.fact("started", "Requests started (accepted for the server)", result.starts)
    c.fact("completed", "Completed (record of the answer)", result.completed)
    causes = Counter(str(x.get("reason")) for x in result.incomplete)
    c.fact("incomplete", "Incomplete (no end recorded)", len(result.incomplete),
           f"{len(result.incomplete)}" + (f" ({', '.join(f'{n} {k}' for k, n in causes.items())})"
                                         if causes else ""))
    c.fact("open", "Still open", result.open_starts)
    t = c.table("incomplete_requests", "Incomplete requests",
                ["seq", "started at seq", "client", "model", "cause", "stopped after"])
    for x in result.incomplete[:100]:
        t.rows.append([x.get("seq"), x.get("start_seq"), x.get("client"), x.get("model"),
                       x.get("reason"), short_ts(str(x.get("stopped_after") or ""))])
    e = c.table("exposures", "Stops after which records may be missing",
                ["before seq", "cause", "what it means"])
    e.rows.extend([x["seq"], x["cause"], x["message"]] for x in result.exposures)
    c.fact("exposures", "Stops after which answered requests may lack a record",
           len(result.exposures))
    if result.broken is not None:
        c.verdict = FAIL
        c.finding = ("the request log is broken (see the chain control): completeness cannot "
                     "be established")
    elif result.exposures:
        c.verdict = FAIL
        c.finding = (f"{len(result.exposures)} stop(s) after which an answered request could "
                     f"be missing its record: {result.exposures[0]['message']}")
    else:
        c.finding = (f"{result.starts:,} request(s) started: {result.completed:,} completed, "
                     f"{len(result.incomplete):,} incomplete"
                     + (f" ({', '.join(f'{n} {k}' for k, n in causes.items())})"
                        if causes else "")
                     + f", {result.open_starts:,} open; no stop could have lost the record of "
                       "an answered request")
        if result.open_starts and not result.closed:
            c.finding += (" (open ones are in flight, or the daemon stopped and has not "
                          "started since: its next start closes them as incomplete)")
    return c


def _activity_control(i: _Inputs, stats: dict[str, Any]) -> Control:
    total = stats["total"]
    c = Control("request_activity", SECTIONS[5], "Requests in the period", INFO, "")
    n = total["requests"]
    c.fact("requests", "Requests", n)
    clients = len([k for k in stats["by_client"] if k != UNAUTHENTICATED])
    c.fact("clients", "Clients", clients)
    c.fact("prompt_tokens", "Prompt tokens", total["prompt_tokens"])
    c.fact("completion_tokens", "Completion tokens", total["completion_tokens"])
    c.fact("errors", "Errors (status ≥ 400)", total["errors"],
           f"{total['errors']:,} ({total['error_rate']:.1%})")
    c.fact("latency_ms_p50", "Latency p50 (ms)", total["latency_ms_p50"])
    c.fact("latency_ms_p99", "Latency p99 (ms)", total["latency_ms_p99"])
    auth = i.history.in_period(i.period, "auth_failed")
    # auth_failed events are summarised: each carries the count it stands for.
    c.fact("auth_failures", "Failed authentications (event log)",
           sum(int(e.get("count", 1)) for e in auth))
    columns = ["requests", "errors", "error rate", "prompt tokens", "completion tokens",
               "p50 ms", "p99 ms"]

    def rows(key: str, title: str, label: str, data: dict[str, dict[str, Any]]) -> None:
        t = c.table(key, title, [label, *columns])
        for name, v in data.items():
            t.rows.append([name, v["requests"], v["errors"], f"{v['error_rate']:.1%}",
                           v["prompt_tokens"], v["completion_tokens"], v["latency_ms_p50"],
                           v["latency_ms_p99"]])

    rows("by_client", "By client", "client", stats["by_client"])
    rows("by_model", "By model", "model", stats["by_model"])
    rows("by_day", "By day (UTC)", "day", stats["by_day"])
    st = c.table("by_status", "By status", ["status", "requests"])
    st.rows.extend([k, v] for k, v in stats["by_status"].items())
    et = c.table("error_classes", "Error classes", ["error", "requests"])
    et.rows.extend([k, v] for k, v in stats["error_classes"].items())
    c.finding = (f"{n:,} requests from {clients} client(s), "
                 f"{total['prompt_tokens']:,} + {total['completion_tokens']:,} tokens, "
                 f"{total['error_rate']:.1%} errors, latency p50 "
                 f"{display_value(total['latency_ms_p50'])} ms / p99 "
                 f"{display_value(total['latency_ms_p99'])} ms")
    unrecordable = i.history.in_period(i.period, "requests_unrecordable")
    if unrecordable:
        c.verdict = WARN
        c.finding += (f"; {len(unrecordable)} time(s) the records could not be written and "
                      "the gateway refused requests")
    return c


# --- incidents --------------------------------------------------------------------------------


def _incident_data(i: _Inputs) -> dict[str, Any]:
    """Restarts with their cause, parked periods, unclean stops: for controls, charts and JSON."""
    period = i.period
    restarts: list[dict[str, Any]] = []
    last_failure: dict[str, Any] | None = None
    starting_reason: str | None = None
    running: dict[str, Any] | None = None   # the daemon_start of the run in progress
    last_state: dict[str, Any] | None = None
    unclean: list[dict[str, Any]] = []
    for ev in i.history.events:
        name = ev.get("event")
        if name in ("exit", "failure"):
            last_failure = ev
        elif name == "state":
            last_state = ev
            if ev.get("to") == "STARTING":
                starting_reason = str(ev.get("reason"))
        elif name == "spawn":
            start = ev.get("start")
            if isinstance(start, int) and start > 1 and period.holds(ev.get("ts")):
                f = last_failure or {}
                restarts.append({
                    "ts": ev["ts"], "start": start, "reason": starting_reason,
                    "kind": f.get("kind"), "message": f.get("message"),
                    "exit": f.get("exit"), "deterministic": f.get("deterministic")})
            last_failure = None
        elif name == "daemon_stop":
            running = None
        elif name == "daemon_start":
            # A start while the previous run never logged its stop: it was killed or crashed.
            if running is not None and period.holds(ev.get("ts")):
                unclean.append({
                    "ts": ev["ts"], "previous_start": running.get("ts"),
                    "previous_pid": running.get("pid"),
                    "last_state": (f"{last_state.get('to')} at {short_ts(last_state['ts'])}"
                                   if last_state is not None else None)})
            running, last_failure, last_state = ev, None, None
    fatal = [iv for iv in state_intervals(i.history, "FATAL") if overlaps(iv, period)]
    quarantined = [iv for iv in state_intervals(i.history, "QUARANTINED")
                   if overlaps(iv, period)]

    def rows(ivs: list[Interval]) -> list[list[Any]]:
        return [[iv.start, iv.end, human_duration(iv.seconds(period.until)), iv.reason]
                for iv in ivs]

    def dicts(ivs: list[Interval]) -> list[dict[str, Any]]:
        return [{"start": iv.start, "end": iv.end,
                 "seconds": round(iv.seconds(period.until), 3), "reason": iv.reason,
                 "ended_by": iv.ended_by} for iv in ivs]

    return {
        "restarts": restarts,
        "fatal_periods": dicts(fatal),
        "quarantines": dicts(quarantined),
        "unclean_stops": unclean,
        "_fatal_rows": rows(fatal),
        "_quarantine_rows": rows(quarantined),
    }


def _coverage_control(i: _Inputs) -> Control:
    h = i.history
    c = Control("event_coverage", SECTIONS[6], "Event log covers the period", PASS, "")
    c.fact("files", "Event log files", [p.name for p in h.files])
    c.fact("oldest_event", "Oldest kept event", h.first_ts)
    c.fact("events_in_period", "Events in the period",
           sum(1 for e in h.events if i.period.holds(e.get("ts"))))
    c.fact("malformed", "Unreadable lines", h.malformed)
    c.fact("retention", "Retention", f"{i.cfg.logs.keep} rotated files of "
           f"{format_size(i.cfg.logs.max_bytes)} (logs.keep, logs.max_bytes)")
    if not h.files:
        c.verdict = FAIL
        c.finding = f"no event log in {i.cfg.logs.dir}: nothing shows what the daemon did"
    elif i.period.lo is not None and (h.first_ts is None or h.first_ts > i.period.lo) \
            and len(h.files) - 1 >= i.cfg.logs.keep:
        # Only once `keep` rotated files exist has rotation started dropping the oldest.
        c.verdict = WARN
        c.finding = (f"the kept events begin at {short_ts(h.first_ts or '?')}, after the "
                     f"period's start, and rotation has been removing the oldest files: "
                     "earlier events are gone (raise logs.keep, or ship events.log elsewhere)")
    elif h.malformed:
        c.verdict = WARN
        c.finding = f"{h.malformed} line(s) of the event log are not valid JSON events"
    elif i.period.lo is not None and (h.first_ts is None or h.first_ts > i.period.lo):
        c.finding = (f"events begin at {short_ts(h.first_ts or '?')}, after the period's "
                     f"start; no rotated file was removed ({len(h.files) - 1} of "
                     f"{i.cfg.logs.keep} kept), so nothing earlier was logged")
    else:
        c.finding = (f"events kept from {short_ts(h.first_ts or '?')}, covering the period")
    return c


def _incidents_control(i: _Inputs, data: dict[str, Any]) -> Control:
    c = Control("incidents", SECTIONS[6], "Restarts, FATAL periods, quarantines", PASS, "")
    r = c.table("restarts", "Restarts of the server", ["time", "start", "cause", "classified as",
                                                       "what happened"])
    for x in data["restarts"]:
        what = str(x["message"] or "")
        if x["exit"] and str(x["exit"]) not in what:
            what = f"{what} ({x['exit']})" if what else str(x["exit"])
        r.rows.append([x["ts"], x["start"], x["reason"], x["kind"], what or None])
    f = c.table("fatal_periods", "FATAL periods", ["start", "end", "duration", "reason"])
    f.rows.extend(data["_fatal_rows"])
    q = c.table("quarantines", "Quarantines", ["start", "end", "duration", "reason"])
    q.rows.extend(data["_quarantine_rows"])
    u = c.table("unclean_stops", "Daemon runs that ended without a clean stop (killed or "
                "crashed)", ["run started", "pid", "last state", "next start"])
    u.rows.extend([x["previous_start"], x["previous_pid"], x["last_state"], x["ts"]]
                  for x in data["unclean_stops"])
    failures = i.history.in_period(i.period, "exit", "failure")
    kinds = Counter(str(e.get("kind")) for e in failures)
    c.fact("restarts", "Restarts", len(data["restarts"]))
    c.fact("failures_by_kind", "Server failures by classification", dict(kinds.most_common()))
    c.fact("probe_failures", "Failed probes", len(i.history.in_period(i.period, "probe_failed")))
    c.fact("orphans", "Orphan clean-ups",
           len(i.history.in_period(i.period, "orphans")))
    survivors = i.history.in_period(i.period, "survivors")
    c.fact("survivors", "Processes that survived SIGKILL", len(survivors))
    parts = [f"{len(data['restarts'])} restart(s)", f"{len(f.rows)} FATAL period(s)",
             f"{len(q.rows)} quarantine(s)", f"{len(u.rows)} unclean daemon stop(s)"]
    if f.rows or q.rows or u.rows or survivors:
        c.verdict = WARN
        c.finding = ", ".join(parts) + " in the period: review them below"
    elif data["restarts"]:
        c.verdict = INFO
        c.finding = ", ".join(parts) + " in the period"
    else:
        c.finding = "no restart, FATAL period or quarantine in the period"
    return c


def _changes_control(i: _Inputs, data: dict[str, Any]) -> Control:
    c = Control("changes", SECTIONS[6], "Key changes and operator actions", INFO, "")
    period = i.period
    try:
        entries = keys_mod.read_keys(i.cfg.gateway.keys_file)
    except keys_mod.KeysFileError as exc:
        entries = []
        c.fact("keys_file_error", "Keys file", str(exc))
    changes: list[dict[str, Any]] = []
    for e in entries:
        if period.holds(e.created):
            changes.append({"ts": e.created, "change": "added", "name": e.name,
                            "role": e.role, "fingerprint": e.fingerprint})
        if e.revoked is not None and period.holds(e.revoked):
            changes.append({"ts": e.revoked, "change": "revoked", "name": e.name,
                            "role": e.role, "fingerprint": e.fingerprint})
    for ev in i.history.in_period(period, "requests.rekey"):
        changes.append({"ts": ev["ts"], "change": "sealing key replaced", "name": None,
                        "role": None, "fingerprint": ev.get("key_id")})
    changes.sort(key=lambda x: x["ts"])
    kt = c.table("key_changes", "Key changes", ["time", "change", "name", "role",
                                                "fingerprint"])
    kt.rows.extend([x["ts"], x["change"], x["name"], x["role"], x["fingerprint"]]
                   for x in changes)
    c.fact("active_keys", "Client keys active now", sum(1 for e in entries if e.active))
    c.fact("revoked_keys", "Client keys revoked (kept for the record)",
           sum(1 for e in entries if not e.active))
    actions: list[dict[str, Any]] = []
    for ev in i.history.events:
        if not period.holds(ev.get("ts")):
            continue
        name = ev.get("event")
        if name == "operator":
            actions.append({"ts": ev["ts"], "action": ev.get("action"),
                            "detail": ev.get("reason")})
        elif name == "release":
            actions.append({"ts": ev["ts"], "action": "release", "detail": ev.get("reason")})
        elif name == "baseline_accepted":
            actions.append({"ts": ev["ts"], "action": "baseline accepted",
                            "detail": ev.get("reason")})
        elif name == "daemon_start":
            actions.append({"ts": ev["ts"], "action": "daemon started",
                            "detail": f"version {ev.get('version')}, pid {ev.get('pid')}, "
                                      f"uid {ev.get('uid')}"})
        elif name == "daemon_stop":
            actions.append({"ts": ev["ts"], "action": "daemon stopped",
                            "detail": f"pid {ev.get('pid')}, state {ev.get('state')}"})
        elif name == "state" and str(ev.get("reason", "")).startswith("restarting: operator"):
            # `sovereignd restart` while serving: the supervisor logs it as this transition.
            actions.append({"ts": ev["ts"], "action": "restart",
                            "detail": str(ev["reason"]).removeprefix("restarting: ")})
        elif name == "state" and ev.get("to") == "STOPPING":
            actions.append({"ts": ev["ts"], "action": "shutdown", "detail": ev.get("reason")})
    at = c.table("operator_actions", "Operator actions and service starts/stops",
                 ["time", "action", "detail"])
    at.rows.extend([x["ts"], x["action"], x["detail"]] for x in actions)
    data["key_changes"] = changes
    data["operator_actions"] = actions
    c.finding = (f"{len(changes)} key change(s), {len(actions)} operator action(s) and "
                 "service start/stop(s) in the period")
    return c


def public_incidents(data: dict[str, Any]) -> dict[str, Any]:
    """The incidents for JSON: without the pre-rendered table rows."""
    return {k: v for k, v in data.items() if not k.startswith("_")}
