"""Several models behind one gateway: one Supervisor per model, held by name.

Each model keeps a whole supervisor of its own (states, restart policy, failure
classification, integrity and environment guards, memory preflight) over a per-model view
of the configuration: the loaded Config with that model's server, integrity and environment
sections and, when there are several models, a state folder of its own
(`<state_dir>/models/NAME`) for its pidfile, socket and private TMPDIR. A quarantined model
therefore stops only itself. `start: always` models run from the daemon's start;
`start: on_demand` models are started by the first request that names them and stopped
after `idle_stop` without one (llama-swap's `ttl`, Ollama's `keep_alive`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sovereignd.backends import registry, tasks
from sovereignd.backends.base import Backend
from sovereignd.config import Config, ModelSpec
from sovereignd.gateway.metrics import Metrics
from sovereignd.logs.eventlog import EventLog
from sovereignd.logs.files import utc_timestamp
from sovereignd.logs.serveroutput import ServerOutput
from sovereignd.supervision.states import PARKED, State
from sovereignd.supervision.supervisor import Request, Supervisor

# Worst first: the state /readyz and `status` report for the models together.
_SEVERITY = (State.QUARANTINED, State.FATAL, State.BACKOFF, State.STOPPING, State.STARTING,
             State.WARMING, State.STOPPED, State.READY)
IDLE_LOOK = 1.0  # how often idle on_demand models are looked at (seconds)


def model_config(cfg: Config, spec: ModelSpec) -> Config:
    """The configuration one model's supervisor sees: its own sections and, with several
    models, its own state folder. The single `server:` form is returned unchanged."""
    if len(cfg.models) <= 1:
        return cfg
    state = cfg.state_dir / "models" / spec.folder
    return dataclasses.replace(
        cfg, server=spec.server, integrity=spec.integrity, environment=spec.environment,
        daemon=dataclasses.replace(cfg.daemon, state_dir=state), models={spec.name: spec})


class ModelEvents(EventLog):
    """The daemon's one event log, seen by one model's parts: every event says `model`."""

    def __init__(self, inner: EventLog, model: str) -> None:  # no file of its own
        self._inner = inner
        self.model = model

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        self._inner.emit(event, level, **{"model": self.model, **fields})

    def add_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self._inner.add_listener(listener)

    def close(self) -> None:
        return None  # the daemon closes the one log


# Builds one model's supervisor and its guards: (supervisor, guards). The daemon passes it,
# so this module needs no knowledge of the integrity monitor or the memory preflight.
Build = Callable[["Model"], tuple[Supervisor, list[Any]]]


@dataclass
class Model:
    """One served model: its configuration view, and its supervisor while it exists."""

    spec: ModelSpec
    cfg: Config
    backend: Backend
    events: EventLog
    metrics: Metrics
    output: ServerOutput
    supervisor: Supervisor | None = None
    guards: list[Any] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    last_used: float = 0.0
    in_flight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    stopped_reason: str = "not started (start: on_demand)"

    @property
    def name(self) -> str:
        return self.spec.name

    @functools.cached_property
    def serves_as(self) -> str:
        """What the server serves this model as (backends.tasks: generate, embed, classify)."""
        return tasks.task_of(self.cfg.server.model, self.cfg.server.args, self.backend.name)

    @property
    def state(self) -> State:
        return self.supervisor.state if self.supervisor is not None else State.STOPPED

    @property
    def reason(self) -> str:
        return self.supervisor.reason if self.supervisor is not None else self.stopped_reason


class NotServed(Exception):
    """A request for a model that cannot be served now: the answer's status and sentence."""

    def __init__(self, status: int, message: str, code: str, *,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.retry_after = retry_after


class Models:
    """The supervisors by name: lookup for routing, on_demand start, idle stop, status."""

    def __init__(self, cfg: Config, events: EventLog, metrics: Metrics, build: Build, *,
                 output_for: Callable[[Config, Backend], ServerOutput],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self._build = build
        self._stopping = False
        self._shutdown = asyncio.Event()
        self._launched = asyncio.Event()  # wakes run() to watch a newly started model
        # Asked before an on_demand model is started by a request: None, or why it cannot
        # start now and the numbers (the memory budget).
        self.admit: Callable[[Model], Awaitable[tuple[str, dict[str, Any]] | None]] | None = None
        self.models: dict[str, Model] = {}
        several = len(cfg.models) > 1
        for spec in cfg.models.values():
            view = model_config(cfg, spec)
            backend = registry.for_config(view)
            self.models[spec.name] = Model(
                spec, view, backend,
                # Every event a model's parts write says `model`, in the single `server:`
                # form too, so one filter (`jq 'select(.model==NAME)'`) serves both forms.
                ModelEvents(events, spec.name),
                Metrics() if several else metrics, output_for(view, backend))
        for model in self.models.values():
            if model.spec.start == "always":
                self._create(model)

    # --- lookup -----------------------------------------------------------------------------

    @property
    def several(self) -> bool:
        return len(self.models) > 1

    def first(self) -> Model:
        return next(iter(self.models.values()))

    def get(self, name: str | None) -> Model | None:
        """The model a request names. With one model every request goes to it, whatever it
        names: its server answers an unknown name itself, as before several models."""
        if not self.several:
            return self.first()
        return self.models.get(name) if name is not None else None

    # --- life -------------------------------------------------------------------------------

    def _create(self, model: Model) -> Supervisor:
        sup, guards = self._build(model)
        model.supervisor, model.guards = sup, guards
        sup.on_transition(lambda _old, _new: model.changed.set())
        return sup

    def _launch(self, model: Model, why: str) -> None:
        model.cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)  # its own folder
        sup = model.supervisor or self._create(model)
        # The first STOPPED -> STARTING says why (the supervisor's default: "daemon started").
        sup._start_reason = why  # set before run(), read by its first start
        self.events.emit("model_start", model=model.name, reason=why)
        for guard in model.guards:
            guard.start()
        model.task = asyncio.get_running_loop().create_task(sup.run(), name=f"model:{model.name}")
        model.task.add_done_callback(lambda _t: model.changed.set())
        self._launched.set()

    async def run(self) -> None:
        """Run the `start: always` models (and on_demand ones as requests come) until
        shutdown; then stop every model's server and return."""
        for model in self.models.values():
            if model.spec.start == "always":
                self._launch(model, "daemon started")
        idle = asyncio.create_task(self._idle_stops(), name="idle-stop")
        try:
            while not self._shutdown.is_set():
                tasks = [m.task for m in self.models.values() if m.task is not None]
                self._launched.clear()
                stop = asyncio.create_task(self._shutdown.wait())
                launched = asyncio.create_task(self._launched.wait())
                done, _ = await asyncio.wait([stop, launched, *tasks],
                                             return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                launched.cancel()
                for task in done:
                    exc = task.exception() if task not in (stop, launched) else None
                    if exc is not None:  # a bug in one supervisor: stop them all, report it
                        self.request(Request.SHUTDOWN, "a model's supervisor failed")
                        await self._stop_all()
                        raise exc
                for model in self.models.values():
                    if model.task is not None and model.task.done():
                        model.task = None
            await self._stop_all()
        finally:
            idle.cancel()
            await asyncio.gather(idle, return_exceptions=True)

    async def _stop_all(self) -> None:
        tasks = [m.task for m in self.models.values() if m.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        for model in self.models.values():
            await self._stop_guards(model)

    async def _stop_guards(self, model: Model) -> None:
        for guard in model.guards:
            with contextlib.suppress(Exception):
                await guard.stop()

    def request(self, kind: Request, reason: str, model: str | None = None,
                **details: Any) -> None:
        """Pass an operator's or a signal's request to every running model (or one)."""
        if kind is Request.SHUTDOWN:
            self._stopping = True
            self._shutdown.set()
        for m in self.models.values():
            if m.supervisor is not None and model in (None, m.name):
                m.supervisor.request(kind, reason, **details)

    def stop_requested(self) -> bool:
        return self._stopping

    async def acquire(self, name: str | None) -> Model:
        """The model a request names, started if it is on_demand and not running, waited for
        up to its start_wait; NotServed when it is unknown or cannot serve now. The caller
        calls release() when the request ends."""
        model = self.get(name)
        if model is None:
            raise self._unknown(name)
        model.in_flight += 1  # from now: a request waiting for a start is not idleness
        try:
            await self._admit(model)
        except BaseException:
            self.release(model)
            raise
        return model

    async def _admit(self, model: Model) -> None:
        model.last_used = self.clock()
        if model.task is None and model.spec.start == "on_demand" and not self._stopping:
            refused = await self.admit(model) if self.admit is not None else None
            if refused is not None:
                self.events.emit("on_demand_refused", level="warning", model=model.name,
                                 reason=refused[0], **refused[1])
                raise NotServed(503, refused[0], "insufficient_memory", retry_after=30)
            if model.task is None:  # (the wait above may have let another request start it)
                self._launch(model, "on demand: a request named the model")
        sup = model.supervisor
        if sup is None:  # an on_demand model while the daemon stops
            raise NotServed(503, f"the model {model.name} is not running: {model.reason}",
                            "not_ready", retry_after=10)
        if not sup.serving() and model.spec.start == "on_demand":
            await self._wait_serving(model, sup)

    def release(self, model: Model) -> None:
        model.in_flight -= 1
        model.last_used = self.clock()

    async def _wait_serving(self, model: Model, sup: Supervisor) -> None:
        deadline = self.clock() + model.spec.start_wait
        while (not sup.serving() and sup.state not in PARKED and self.clock() < deadline
               and model.supervisor is sup and model.task is not None):
            model.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - self.clock()):
                    await model.changed.wait()

    def _unknown(self, name: str | None) -> NotServed:
        if name is None:
            return NotServed(400, "this gateway serves several models: name one in `model` ("
                             + ", ".join(self.models) + ")", "model_required")
        return NotServed(404, f"The model `{name}` does not exist or you do not have access "
                         "to it.", "model_not_found")

    async def _idle_stops(self) -> None:
        """Stop on_demand models that have had no request for their idle_stop."""
        while True:
            await asyncio.sleep(IDLE_LOOK)
            for model in self.models.values():
                spec = model.spec
                if (spec.start != "on_demand" or spec.idle_stop <= 0 or model.task is None
                        or model.in_flight or self._stopping
                        or self.clock() - model.last_used < spec.idle_stop):
                    continue
                await self.stop_model(model, f"idle for {spec.idle_stop:g}s (idle_stop)")

    async def stop_model(self, model: Model, reason: str) -> None:
        """Stop one on_demand model's server (idle, or to free memory); the next request
        starts it again."""
        sup, task = model.supervisor, model.task
        if sup is None or task is None:
            return
        self.events.emit("model_stop", model=model.name, reason=reason)
        sup.request(Request.SHUTDOWN, reason)
        await asyncio.gather(task, return_exceptions=True)
        await self._stop_guards(model)
        model.task, model.supervisor, model.guards = None, None, []
        model.stopped_reason = reason
        model.changed.set()

    # --- what the endpoints show ------------------------------------------------------------

    def readiness(self, name: str | None) -> tuple[bool, dict[str, Any], State]:
        """(ready, body, state) for /readyz: one model, or every `start: always` model."""
        if name is not None:
            model = self.models.get(name)
            if model is None:
                raise self._unknown(name)
            return self._one(model)
        if not self.several:
            return self._one(self.first())
        parts = {n: self._one(m) for n, m in self.models.items()}
        always = [n for n, m in self.models.items() if m.spec.start == "always"]
        ready = all(parts[n][0] for n in always)
        states = [parts[n][2] for n in always] or [State.READY]
        worst = min(states, key=_SEVERITY.index)
        waiting = [n for n in always if not parts[n][0]]
        reason = ("every start: always model is READY" if ready
                  else "not READY: " + ", ".join(waiting))
        return ready, {"state": worst.value if not ready else State.READY.value,
                       "reason": reason, "models": {n: p[1] for n, p in parts.items()}}, worst

    def _one(self, model: Model) -> tuple[bool, dict[str, Any], State]:
        sup = model.supervisor
        body: dict[str, Any] = {"state": model.state.value, "reason": model.reason}
        if sup is None:
            return False, body, State.STOPPED
        if sup.degraded:
            body["degraded"] = dict(sup.degraded)
        if sup.suspect is not None:
            body["suspect"] = sup.suspect
        return sup.serving(), body, sup.state

    @property
    def state(self) -> State:
        return self.readiness(None)[2]

    def status(self) -> dict[str, Any]:
        """/status: the first model's fields at the top (the single-model shape), and every
        model under `models`."""
        top = self._status_of(self.first())
        if self.several:
            body = self.readiness(None)[1]
            top.update(state=body["state"], reason=body["reason"])
        top["models"] = {n: self._status_of(m) for n, m in self.models.items()}
        return top

    def _status_of(self, model: Model) -> dict[str, Any]:
        if model.supervisor is not None:
            st = model.supervisor.status()
        else:
            st = {"state": State.STOPPED.value, "reason": model.stopped_reason,
                  "backend": model.backend.name, "server": None,
                  "model": {"name": model.name, "path": str(model.cfg.server.model)}}
        st["start"] = model.spec.start
        if model.spec.start == "on_demand":
            st["idle_stop_s"] = model.spec.idle_stop
            st["last_request"] = (utc_timestamp(time.time() - (self.clock() - model.last_used))
                                  if model.last_used else None)
        st["in_flight"] = model.in_flight
        return st
