"""Prometheus metrics on a registry of the daemon's own (no global default registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sovereignd import __version__
from sovereignd.states import State

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0, 300.0)
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric the daemon exports; the gateway adds its request metrics here too."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Gauge("sovereignd_build_info", "sovereignd version", ["version", "backend"],
                          registry=r)
        self.state = Gauge("sovereignd_state", "1 for the supervisor's current state",
                           ["state"], registry=r)
        self.server_up = Gauge("sovereignd_server_up", "1 while the server is READY", registry=r)
        self.restarts = Counter("sovereignd_restarts", "Server restarts after a failure",
                                registry=r)
        self.failures = Counter("sovereignd_server_failures", "Server failures by kind",
                                ["kind"], registry=r)
        self.probe_latency = Histogram("sovereignd_probe_latency_seconds",
                                       "Latency of probes of the server", ["kind"],
                                       buckets=PROBE_BUCKETS, registry=r)
        self.probe_failures = Counter("sovereignd_probe_failures", "Failed probes", ["kind"],
                                      registry=r)
        self.orphans_killed = Counter("sovereignd_orphans_killed",
                                      "Leftover server processes stopped", registry=r)
        # The gateway's requests.
        self.requests = Counter("sovereignd_requests", "Requests through the gateway",
                                ["route", "status", "client"], registry=r)
        self.request_latency = Histogram("sovereignd_request_latency_seconds",
                                         "Request start to last byte", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("sovereignd_time_to_first_token_seconds",
                              "Request start to first streamed token", ["route"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("sovereignd_tokens", "Tokens reported by the server",
                              ["client", "kind"], registry=r)
        self.in_flight = Gauge("sovereignd_requests_in_flight", "Requests being served",
                               registry=r)
        self.auth_failures = Counter("sovereignd_auth_failures", "Failed authentications",
                                     ["reason"], registry=r)
        for s in State:
            self.state.labels(state=s.value).set(0)
        self.state.labels(state=State.STOPPED.value).set(1)

    def set_state(self, old: State, new: State) -> None:
        self.state.labels(state=old.value).set(0)
        self.state.labels(state=new.value).set(1)
        self.server_up.set(1 if new is State.READY else 0)

    def set_info(self, backend: str) -> None:
        self.info.labels(version=__version__, backend=backend).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
