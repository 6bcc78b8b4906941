"""Prometheus metrics on a registry of the daemon's own (no global default registry)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sovereignd import __version__
from sovereignd.supervision.states import State

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0, 300.0)
PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

M = TypeVar("M", Counter, Gauge, Histogram)


class _Children(Generic[M]):
    """A labelled metric's children by label values, looked up once per label set.

    prometheus_client's `labels()` checks the names, converts every value and takes a lock on
    each call: on the gateway's path that cost more than the increments it was for.
    """

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


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
        self.shm_removed = Counter("sovereignd_shm_removed",
                                   "Shared-memory segments and semaphores of dead servers "
                                   "removed", registry=r)
        self.stalls = Counter("sovereignd_stalls", "Stalls of the server: suspected (/readyz "
                              "503) and confirmed (restart)", ["stage"], registry=r)
        self.event_log_failures = Counter("sovereignd_event_log_failures",
                                          "Events that could not be written to events.log "
                                          "(written to stderr instead)", registry=r)
        # Monotonic time of the last byte from the server to a forwarded request (the proxy
        # sets it): progress, for the stall watch.
        self.upstream_progress = 0.0
        # Requests sent to the server whose answer the gateway is still waiting for or reading
        # from it (the proxy counts them, `ServerWait`): work at the server, for the stall
        # watch. Not requests_in_flight: that also counts answers the server has given in
        # full which wait for their record's fsync or for the client to read them.
        self.upstream_pending = 0
        self.at_server = Gauge("sovereignd_requests_at_server",
                               "Requests sent to the model server whose answer is not yet read "
                               "in full: the work the stall watch expects progress on",
                               registry=r)
        self.at_server.set_function(lambda: self.upstream_pending)
        # The gateway's requests.
        self.requests = Counter("sovereignd_requests", "Requests through the gateway",
                                ["route", "status", "client", "model"], registry=r)
        self.request_latency = Histogram("sovereignd_request_latency_seconds",
                                         "Request start to last byte", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("sovereignd_time_to_first_token_seconds",
                              "Request start to first streamed token", ["route"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("sovereignd_tokens", "Tokens reported by the server",
                              ["client", "kind", "model"], registry=r)
        self.in_flight = Gauge("sovereignd_requests_in_flight", "Requests being served",
                               registry=r)
        # The gateway counts in this plain integer; the gauge reads it when scraped.
        self.requests_in_flight = 0
        self.in_flight.set_function(lambda: self.requests_in_flight)
        self.auth_failures = Counter("sovereignd_auth_failures", "Failed authentications",
                                     ["reason"], registry=r)
        self.request_log_bytes = Gauge("sovereignd_request_log_bytes",
                                       "Bytes of request record files", registry=r)
        self.request_log_disk_free = Gauge("sovereignd_request_log_disk_free_bytes",
                                           "Free bytes on the request log's file system",
                                           registry=r)
        self._requests = _Children(self.requests)
        self._latency = _Children(self.request_latency)
        self._ttft = _Children(self.ttft)
        self._tokens = _Children(self.tokens)
        for stage in ("suspected", "confirmed"):
            self.stalls.labels(stage=stage)
        for s in State:
            self.state.labels(state=s.value).set(0)
        self.state.labels(state=State.STOPPED.value).set(1)

    def set_state(self, old: State, new: State) -> None:
        self.state.labels(state=old.value).set(0)
        self.state.labels(state=new.value).set(1)
        self.server_up.set(1 if new is State.READY else 0)

    def count_request(self, route: str, status: int, client: str, *, latency_ms: float | None,
                      ttft_ms: float | None, prompt_tokens: Any, completion_tokens: Any,
                      model: str = "-") -> None:
        """One finished gateway request: its count, latency, time to first token, tokens
        (`model`: the served model it named, "-" for none)."""
        self._requests(route, str(status), client, model).inc()
        if latency_ms is not None:
            self._latency(route).observe(latency_ms / 1000)
        if ttft_ms is not None:
            self._ttft(route).observe(ttft_ms / 1000)
        if isinstance(prompt_tokens, int) and prompt_tokens > 0:
            self._tokens(client, "prompt", model).inc(prompt_tokens)
        if isinstance(completion_tokens, int) and completion_tokens > 0:
            self._tokens(client, "completion", model).inc(completion_tokens)

    def set_record_space(self, used: int, free: int) -> None:
        self.request_log_bytes.set(used)
        self.request_log_disk_free.set(free)

    def set_info(self, backend: str) -> None:
        self.info.labels(version=__version__, backend=backend).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ServerWait:
    """One request's share of `Metrics.upstream_pending`: counted from the moment the gateway
    sends it to the server until the server's answer is read in full, and not while the
    gateway writes to the client (`paused`): a client that reads slowly holds the server up,
    the server does not hold it up. `end` is idempotent, so error paths may call it freely."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._counted = False

    def begin(self) -> None:
        if not self._counted:
            self._metrics.upstream_pending += 1
            self._counted = True

    def end(self) -> None:
        if self._counted:
            self._metrics.upstream_pending -= 1
            self._counted = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Not counted inside (the gateway waits on the client); counted again after."""
        was = self._counted
        self.end()
        try:
            yield
        finally:
            if was:
                self.begin()
