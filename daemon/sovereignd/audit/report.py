"""`sovereignd audit`: the auditor's question answered for a period, one control at a time.

Which model and which software served which requests for whom, did anything drift or fail,
and can the records be proved complete? `build_report` reads the configuration, the files it
names, the event log, the request log (verified whole with `logs.verify`) and the host, and
returns an `AuditReport` (`model`): one PASS / FAIL / WARN / INFO verdict per control with the
evidence under it. The controls live in `controls/`, one module per section of the report;
`render` turns the report into Markdown, HTML or JSON; `cli` decides the exit status.

Verdicts: PASS the control holds; FAIL it does not (the report's result is FAIL); WARN it
could not be fully judged or needs a person's look; INFO facts without a verdict.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Iterable

from sovereignd import __version__
from sovereignd.audit.controls.configuration import (
    config_control,
    listen_control,
    offline_control,
    secrets_control,
)
from sovereignd.audit.controls.host import account_control, host_control, launch_control
from sovereignd.audit.controls.incidents import (
    changes_control,
    coverage_control,
    incident_data,
    incidents_control,
    public_incidents,
)
from sovereignd.audit.controls.integrity import integrity_control
from sovereignd.audit.controls.models import models_control
from sovereignd.audit.controls.posture import egress_control, posture_control
from sovereignd.audit.controls.requests import activity_control, chain_control, records_control
from sovereignd.audit.controls.software import environment_control, self_control
from sovereignd.audit.evidence import AuditError, Period, request_stats
from sovereignd.audit.inputs import gather
from sovereignd.audit.model import (
    FAIL,
    INFO,
    PASS,
    SCHEMA,
    SECTIONS,
    VERDICTS,
    WARN,
    AuditReport,
    Control,
    Fact,
    Table,
    display_value,
    human_duration,
    short_ts,
)
from sovereignd.config import Config
from sovereignd.logs import verify
from sovereignd.logs.files import utc_timestamp
from sovereignd.logs.records import iter_records
from sovereignd.service import hostfacts
from sovereignd.units import human_size

# Bars in a chart: beyond this many days the chart shows the most recent ones.
MAX_CHART_DAYS = 366


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
    inputs = gather(cfg, period, probe or hostfacts.HostProbe(), verification_keys)
    host = hostfacts.identity(inputs.probe)
    stats = request_stats(iter_records(cfg.logs.dir, period.since, period.until))
    chain = verify.verify_logs(cfg.logs.dir, inputs.keys or None, cfg.state_dir)
    incidents = incident_data(inputs)
    # In the order of the report: its sections (SECTIONS), then the controls of each.
    controls = [
        host_control(inputs, host),
        account_control(inputs),
        launch_control(inputs),
        config_control(inputs),
        listen_control(inputs),
        offline_control(inputs),
        secrets_control(inputs),
        posture_control(inputs),
        egress_control(inputs),
        integrity_control(inputs, incidents),
        environment_control(inputs),
        self_control(inputs),
        chain_control(inputs, chain),
        records_control(inputs, chain),
        activity_control(inputs, stats),
        coverage_control(inputs),
        incidents_control(inputs, incidents),
        changes_control(inputs, incidents),
    ]
    if len(cfg.models) > 1:
        controls.append(models_control(inputs, stats))
    charts = {
        "requests_per_day": _daily(period, {d: t["requests"] for d, t in
                                            stats["by_day"].items()}),
        "restarts_per_day": _daily(period, Counter(r["ts"][:10] for r in
                                                   incidents["restarts"])),
    }
    incidents = public_incidents(incidents)
    start_text = (period.lo if period.lo is not None else
                  f"start of the kept logs ({short_ts(inputs.history.first_ts or '') or 'none'})")
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


# The report's model, importable from here as before the split (render, cli, tests).
__all__ = ["FAIL", "INFO", "PASS", "SCHEMA", "SECTIONS", "VERDICTS", "WARN", "AuditReport",
           "Control", "Fact", "Table", "build_report", "display_value", "human_duration",
           "human_size", "public_incidents", "short_ts"]
