"""`sovereignd run`: wire the parts together and run them on one asyncio loop, in the
foreground (launchd and systemd supervise it; it never daemonizes itself)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import uvloop

from sovereignd import __version__
from sovereignd.backends import memory, registry
from sovereignd.config import Config
from sovereignd.gateway.control import ControlServer
from sovereignd.gateway.endpoints import Gateway
from sovereignd.gateway.keys import KeyStore, usage_flusher
from sovereignd.gateway.metrics import Metrics
from sovereignd.gateway.proxy import Proxy
from sovereignd.integrity import monitor, selfcheck
from sovereignd.logs import recordspace
from sovereignd.logs.eventlog import EventLog
from sovereignd.logs.files import RotatingFile
from sovereignd.logs.libraries import route_library_logs
from sovereignd.logs.requestlog import RequestLog, maintain
from sovereignd.logs.serveroutput import ServerOutput
from sovereignd.service import fdlimit, guardrails, upgrade
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
    output = ServerOutput(RotatingFile(cfg.logs.dir / "server.log", cfg.logs.max_bytes,
                                       cfg.logs.keep, mode=0o640),
                          cfg.server.output_buffer, backend.content_line,
                          cfg.server.content_lines)
    supervisor = Supervisor(cfg, backend, events, metrics, output=output)
    loop = asyncio.get_running_loop()
    # Handlers only record the request; the supervisor's loop acts on it (also a SIGTERM that
    # arrives while the rest is still being set up: run() then stops at once, cleanly, and the
    # request log, opened below, is closed as after any clean stop).
    loop.add_signal_handler(signal.SIGTERM, supervisor.request, Request.SHUTDOWN, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, supervisor.request, Request.SHUTDOWN, "SIGINT")
    # Gates run in order before every start: drifted files quarantine before memory is judged.
    watchers = monitor.guards_for(cfg, supervisor, events)
    watchers += selfcheck.guards_for(cfg, supervisor, events)  # the daemon's own code
    supervisor.add_gate(memory.gate(memory.Preflight(cfg), events))
    keys = KeyStore(cfg.gateway.keys_file, cfg.state_dir / "keys-usage.json", emit=events.emit)
    keys.load()
    requests = RequestLog.from_config(cfg, emit=events.emit)
    requests.open()
    gateway = Gateway(cfg, supervisor, metrics, events, nofile=nofile)
    proxy = Proxy(cfg, supervisor, backend, keys=keys, log=requests, metrics=metrics,
                  events=events)
    proxy.install(gateway.app)
    gateway.admin_check = proxy.admin_check
    gateway.on_refused = proxy.record_refusal
    control = ControlServer(cfg.control_socket, supervisor)
    control.add_action("upgrade", upgrade.event_action(events))  # `sovereignd upgrade` steps
    pending: set[asyncio.Task[None]] = set()

    def baseline_accepted(body: dict[str, Any]) -> dict[str, Any]:
        # `sovereignd baseline --accept` wrote new baselines: reload, verify, leave quarantine.
        reason = str(body.get("reason") or "operator accepted a new baseline")
        task = asyncio.get_running_loop().create_task(
            monitor.accept(watchers, supervisor, events, reason))
        pending.add(task)
        task.add_done_callback(pending.discard)
        return {"ok": True, "message": f"baseline accepted; re-verifying (state was "
                                       f"{supervisor.state})"}

    control.add_action("baseline-accepted", baseline_accepted)

    def on_sighup() -> None:
        # SIGHUP: re-read the client keys, and leave FATAL / re-check a quarantine.
        with contextlib.suppress(Exception):  # a bad file is logged by the store; keep the set
            keys.reload()
        supervisor.request(Request.RESET, "SIGHUP")

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
        for watcher in watchers:
            watcher.start()
        await supervisor.run()
    finally:
        for watcher in watchers:
            await watcher.stop()
        await control.stop()
        await gateway.stop()
        await proxy.close()
        stop_background.set()
        await asyncio.gather(*background, return_exceptions=True)
        events.emit("requests.checkpoint", **requests.close().fields(), final=True)
        events.emit("daemon_stop", pid=os.getpid(), state=supervisor.state.value)
        unroute_logs()
        events.close()
        output.close()
    return 0
