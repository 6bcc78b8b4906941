"""The audit's per-model control: with several models, each one's weights checks, incidents
and requests in the period (the events and records say which model)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sovereignd.audit.evidence import EventHistory, Period
from sovereignd.audit.inputs import Inputs
from sovereignd.audit.model import PASS, SECTIONS, WARN, Control
from sovereignd.config import Config


def model_rows(cfg: Config, history: EventHistory, period: Period,
               by_model: dict[str, dict[str, Any]]) -> tuple[list[list[Any]], int]:
    """One row per configured model (start policy, weights verifications and drifts,
    quarantines, FATAL periods, restarts, requests, errors), and the number of models
    quarantined or FATAL in the period."""
    counts: dict[str, Counter[str]] = {name: Counter() for name in cfg.models}
    for e in history.in_period(period, "integrity_verified", "integrity_drift", "state"):
        model = e.get("model")
        if model not in counts:
            continue
        if e["event"] == "state":
            to = e.get("to")
            if to in ("QUARANTINED", "FATAL"):
                counts[model][to] += 1
            elif to == "STARTING" and e.get("from") == "BACKOFF":
                counts[model]["restarts"] += 1
        else:
            counts[model][e["event"]] += 1
    rows = []
    for name, spec in cfg.models.items():
        c, req = counts[name], by_model.get(name, {})
        rows.append([name, spec.start, c["integrity_verified"], c["integrity_drift"],
                     c["QUARANTINED"], c["FATAL"], c["restarts"], req.get("requests", 0),
                     req.get("errors", 0)])
    troubled = sum(1 for c in counts.values() if c["QUARANTINED"] or c["FATAL"])
    return rows, troubled


COLUMNS = ["model", "start", "weights verified", "weights drifted", "quarantines", "FATAL",
           "restarts", "requests", "errors"]


def models_control(i: Inputs, stats: dict[str, Any]) -> Control:
    """With several models: each one's weights checks, incidents and requests."""
    c = Control("models", SECTIONS[6], "Each model: weights, incidents, requests", PASS, "")
    rows, troubled = model_rows(i.cfg, i.history, i.period, stats["by_model"])
    c.table("by_model", "By model", COLUMNS).rows.extend(rows)
    c.fact("models", "Models", len(rows))
    if troubled:
        c.verdict = WARN
        c.finding = f"{troubled} of {len(rows)} model(s) were quarantined or FATAL in the period"
    else:
        c.finding = f"{len(rows)} models; none quarantined or FATAL in the period"
    return c
