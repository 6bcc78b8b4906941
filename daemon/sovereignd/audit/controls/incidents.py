"""Incident controls: restarts, FATAL periods, quarantines, coverage, changes."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sovereignd.audit.evidence import Interval, overlaps, state_intervals
from sovereignd.audit.inputs import Inputs
from sovereignd.audit.model import (
    FAIL,
    INFO,
    PASS,
    SECTIONS,
    WARN,
    Control,
    human_duration,
    short_ts,
)
from sovereignd.gateway import keys as keys_mod
from sovereignd.units import format_size


def incident_data(i: Inputs) -> dict[str, Any]:
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


def coverage_control(i: Inputs) -> Control:
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


def incidents_control(i: Inputs, data: dict[str, Any]) -> Control:
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


def changes_control(i: Inputs, data: dict[str, Any]) -> Control:
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
