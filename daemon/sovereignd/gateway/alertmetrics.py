"""Metrics for alerting across hosts (ops/fleet/alerts.yml): the guards' current results,
the events the daemon recorded, and whether the request records' disk space is low.

Read at scrape time from what the daemon already keeps (the supervisor's checks) or learnt
from the event stream (EventLog listeners), so the parts that find a problem need not know
about Prometheus:
- `sovereignd_check{check, result}` 1 for each guard's current result (integrity,
  environment, self; result ok, drift, error, disabled, pending),
- `sovereignd_events_total{event, level}` events recorded since the daemon started (e.g.
  `requests.unsealed`, `requests.torn_line`, `requests.epoch_gap`: the request records'
  chain did not verify when the log was opened),
- `sovereignd_request_log_space_low` 1 between `requests.space_low` and `requests.space_ok`,
- `sovereignd_keys_info{fingerprint}` the client keys in effect (keys.set_fingerprint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from sovereignd.gateway.metrics import Metrics
from sovereignd.logs.eventlog import EventLog

RESULTS = ("ok", "drift", "error", "disabled", "pending")


def result_label(result: object) -> str:
    """A guard's result as a bounded label value ("not verified yet" -> "pending")."""
    text = str(result)
    return text if text in RESULTS else "pending"


GUARDS = ("integrity", "environment", "self")  # the supervisor's checks that are guards


class _Checks(Collector):
    def __init__(self, checks: Callable[[], Mapping[str, Mapping[str, Any]]],
                 keys_fingerprint: Callable[[], str]) -> None:
        self._checks = checks
        self._keys = keys_fingerprint

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("sovereignd_check", "1 for each guard's current result "
                                   "(integrity, environment, self), per model",
                                   labels=["check", "result", "model"])
        for model, checks in sorted(self._checks().items()):
            for name, status in sorted(checks.items()):
                if name not in GUARDS:
                    continue
                current = result_label(status.get("result") if isinstance(status, dict)
                                       else None)
                for result in RESULTS:
                    family.add_metric([name, result, model], 1.0 if result == current else 0.0)
        yield family
        keys = GaugeMetricFamily("sovereignd_keys_info", "1, labelled with the fingerprint of "
                                 "the client keys in effect (equal on hosts with the same keys)",
                                 labels=["fingerprint"])
        keys.add_metric([self._keys()], 1.0)
        yield keys


def install(metrics: Metrics, checks: Callable[[], Mapping[str, Mapping[str, Any]]],
            events: EventLog, keys_fingerprint: Callable[[], str]) -> None:
    """Register these metrics on the daemon's registry and listen to its events (`checks`:
    each started model's supervisor checks, by model name, read at scrape time)."""
    metrics.registry.register(_Checks(checks, keys_fingerprint))
    counted = Counter("sovereignd_events", "Events recorded since the daemon started",
                      ["event", "level"], registry=metrics.registry)
    space_low = Gauge("sovereignd_request_log_space_low", "1 while the request records' disk "
                      "space is low (requests.space_low until requests.space_ok)",
                      registry=metrics.registry)

    def listen(event: dict[str, Any]) -> None:
        name, level = str(event.get("event")), str(event.get("level"))
        counted.labels(event=name, level=level).inc()
        if name == "requests.space_low":
            space_low.set(1)
        elif name == "requests.space_ok":
            space_low.set(0)

    events.add_listener(listen)
