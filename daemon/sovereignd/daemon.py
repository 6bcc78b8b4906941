"""`sovereignd run`: wire the parts together and run them on one asyncio loop, in the
foreground (launchd and systemd supervise it; it never daemonizes itself)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import uvloop

from sovereignd import __version__
from sovereignd.backends import memory, registry
from sovereignd.backends.base import Backend
from sovereignd.config import Config
from sovereignd.gateway import alertmetrics, drainstate, modelmetrics
from sovereignd.gateway.control import ControlServer
from sovereignd.gateway.drain import Drain
from sovereignd.gateway.endpoints import Gateway
from sovereignd.gateway.keys import KeyStore, usage_flusher
from sovereignd.gateway.metrics import Metrics
from sovereignd.gateway.proxy import Proxy
from sovereignd.gateway.quotas import month_start
from sovereignd.gateway.routing import Router
from sovereignd.integrity import monitor, selfcheck
from sovereignd.integrity.reuse import Verifications
from sovereignd.logs import recordspace
from sovereignd.logs.eventlog import EventLog
from sovereignd.logs.files import RotatingFile
from sovereignd.logs.libraries import route_library_logs
from sovereignd.logs.records import iter_records
from sovereignd.logs.requestlog import RequestLog, maintain
from sovereignd.logs.serveroutput import ServerOutput
from sovereignd.service import fdlimit, guardrails, upgrade
from sovereignd.supervision import budget
from sovereignd.supervision.models import Model, Models
from sovereignd.supervision.supervisor import Request, Supervisor


def run(cfg: Config, allow_root: bool = False) -> int:
    """Run until SIGTERM/SIGINT; return the exit status (0 after a clean shutdown).

    The guard rails run first: a refusal (UnsafeHost) happens before any file is written or
    any process is spawned."""
    guardrails.enforce(cfg, allow_root)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_main(cfg, allow_root))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop: the gateway's per-request cost is mostly event-loop work, which uvloop does in
    C (measured: +10 % requests/s through the gateway). SOVEREIGND_LOOP=asyncio selects the
    standard loop, should uvloop ever be the suspect."""
    if os.environ.get("SOVEREIGND_LOOP") == "asyncio":
        return None
    return uvloop.new_event_loop


async def _main(cfg: Config, allow_root: bool) -> int:
    nofile_before, nofile, nofile_hard = fdlimit.raise_nofile()
    for path in (cfg.logs.dir, cfg.state_dir):
        path.mkdir(parents=True, exist_ok=True, mode=0o750)
    events = EventLog(cfg.logs.dir, cfg.logs.max_bytes, cfg.logs.keep)
    unroute_logs = route_library_logs(events.emit)  # no plain-text line on stderr
    metrics = Metrics()
    events.on_write_failure = metrics.event_log_failures.inc
    backend = registry.for_config(cfg)
    metrics.set_info(backend.name)
    outputs: list[ServerOutput] = []

    def output_for(view: Config, model_backend: Backend) -> ServerOutput:
        # One server.log per model (server.NAME.log when there are several).
        name = "server.log" if len(cfg.models) <= 1 else \
            f"server.{next(iter(view.models.values())).folder}.log"
        out = ServerOutput(RotatingFile(cfg.logs.dir / name, cfg.logs.max_bytes, cfg.logs.keep,
                                        mode=0o640), view.server.output_buffer,
                           model_backend.content_line, view.server.content_lines)
        outputs.append(out)
        return out

    # Full verifications that passed, reused by a later start while nothing changed.
    verifications = Verifications()

    def build(model: Model) -> tuple[Supervisor, list[Any]]:
        sup = Supervisor(model.cfg, model.backend, model.events, model.metrics,
                         output=model.output)
        # Gates run in order before every start: drifted files quarantine before memory is
        # judged.
        guards: list[Any] = monitor.guards_for(model.cfg, sup, model.events, verifications)
        guards += selfcheck.guards_for(model.cfg, sup, model.events)  # the daemon's own code
        sup.checks["memory"] = {"result": "not estimated yet"}  # /status: each model's need
        sup.add_gate(memory.gate(memory.Preflight(model.cfg), model.events,
                                 sup.checks["memory"]))
        sup.add_gate(budget.gate_for(lambda: models, model))
        return sup, guards

    models = Models(cfg, events, metrics, build, output_for=output_for)
    if models.several:
        modelmetrics.merge(metrics, {n: m.metrics for n, m in models.models.items()})
    models.admit = lambda model: budget.make_room(models, model)
    first = models.first()
    # The gateway and the proxy reach every model through `models`; this one (the first
    # model's, or a bare one for an on_demand first model) only fills their single-model slot.
    supervisor = first.supervisor or Supervisor(first.cfg, first.backend, first.events,
                                                first.metrics, output=first.output)
    loop = asyncio.get_running_loop()
    # Handlers only record the request; the supervisors' loops act on it (also a SIGTERM that
    # arrives while the rest is still being set up: run() then stops at once, cleanly, and the
    # request log, opened below, is closed as after any clean stop).
    loop.add_signal_handler(signal.SIGTERM, models.request, Request.SHUTDOWN, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, models.request, Request.SHUTDOWN, "SIGINT")
    keys = KeyStore(cfg.gateway.keys_file, cfg.state_dir / "keys-usage.json", emit=events.emit)
    keys.load()

    def keys_in_effect() -> str:
        # The set a request would meet now: the file is re-read if it changed (one stat).
        keys.reload()
        return keys.fingerprint

    # Guard results, events, disk space, the keys in effect: for alerts across hosts.
    alertmetrics.install(metrics, lambda: {
        n: m.supervisor.checks for n, m in models.models.items() if m.supervisor is not None},
        events, keys_in_effect)
    requests = RequestLog.from_config(cfg, emit=events.emit)
    requests.open()
    gateway = Gateway(cfg, supervisor, metrics, events, nofile=nofile)
    gateway.models = models
    proxy = Proxy(cfg, supervisor, backend, keys=keys, log=requests, metrics=metrics,
                  events=events)
    proxy.router = Router(models)
    proxy.serve_backends([m.backend for m in models.models.values()])
    proxy.install(gateway.app)
    # Quotas count what the records say: this month's records again, before any request.
    proxy.quotas.load(iter_records(cfg.logs.dir, since=month_start(time.time())))
    gateway.admin_check = proxy.admin_check
    # `sovereignd drain` / `resume`; a drain saved by an earlier run holds from the start.
    drain = Drain(events.emit, metrics, drainstate.state_path(cfg.state_dir))
    drain.restore()
    gateway.drain = proxy.drain = drain
    gateway.on_refused = proxy.record_refusal
    control = ControlServer(cfg.control_socket, models)
    control.add_action("upgrade", upgrade.event_action(events))  # `sovereignd upgrade` steps
    for name, action in drain.actions().items():
        control.add_action(name, action)
    gateway.status_parts["drain"] = control.status_parts["drain"] = drain.status
    gateway.status_parts["keys"] = control.status_parts["keys"] = lambda: {
        "file": str(keys.path), "fingerprint": keys_in_effect(), "active": len(keys.clients())}
    pending: set[asyncio.Task[None]] = set()

    def baseline_accepted(body: dict[str, Any]) -> dict[str, Any]:
        # `sovereignd baseline --accept` wrote new baselines: reload, verify, leave quarantine.
        reason = str(body.get("reason") or "operator accepted a new baseline")
        for model in models.models.values():
            if model.supervisor is None:
                continue  # an on_demand model verifies its baselines when it starts
            task = asyncio.get_running_loop().create_task(
                monitor.accept(model.guards, model.supervisor, model.events, reason))
            pending.add(task)
            task.add_done_callback(pending.discard)
        return {"ok": True, "message": f"baseline accepted; re-verifying (state was "
                                       f"{models.state})"}

    control.add_action("baseline-accepted", baseline_accepted)

    def on_sighup() -> None:
        # SIGHUP: re-read the client keys, and leave FATAL / re-check a quarantine.
        with contextlib.suppress(Exception):  # a bad file is logged by the store; keep the set
            keys.reload()
        models.request(Request.RESET, "SIGHUP")

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    stop_background = asyncio.Event()
    background = [
        asyncio.create_task(maintain(requests, events.emit, stop_background,
                                     checkpoint_interval=cfg.requests.checkpoint_interval),
                            name="requestlog"),
        asyncio.create_task(usage_flusher(keys, stop_background), name="key-usage"),
        asyncio.create_task(recordspace.watch(cfg, events.emit, metrics.set_record_space,
                                              stop_background), name="record-space"),
    ]
    try:
        await gateway.start()
        await control.start()
        events.emit("daemon_start", version=__version__, pid=os.getpid(), uid=os.getuid(),
                    config=str(cfg.source), config_sha256=cfg.digest, backend=backend.name,
                    listen=cfg.gateway.listen, python=sys.version.split()[0],
                    loop=type(asyncio.get_running_loop()).__module__.partition(".")[0],
                    clients=len(keys.clients()),
                    nofile={"soft_at_start": nofile_before, "soft": nofile, "hard": nofile_hard,
                            "reserved": cfg.daemon.reserved_fds,
                            "max_connections": gateway.max_connections,
                            "max_connections_per_address": gateway.max_per_address})
        await models.run()  # starts each model's guards, then its supervisor
    finally:
        await control.stop()
        await gateway.stop()
        await proxy.close()
        stop_background.set()
        await asyncio.gather(*background, return_exceptions=True)
        events.emit("requests.checkpoint", **requests.close().fields(), final=True)
        events.emit("daemon_stop", pid=os.getpid(), state=models.state.value)
        unroute_logs()
        events.close()
        for output in outputs:
            output.close()
    return 0
