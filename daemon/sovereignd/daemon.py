"""`sovereignd run`: wire the parts together and run them on one asyncio loop, in the
foreground (launchd and systemd supervise it; it never daemonizes itself)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from sovereignd import __version__, backends, guards, memory, upgrade
from sovereignd.config import Config
from sovereignd.control import ControlServer
from sovereignd.eventlog import EventLog
from sovereignd.gateway import Gateway
from sovereignd.logfiles import RotatingFile
from sovereignd.metrics import Metrics
from sovereignd.serverlog import ServerOutput
from sovereignd.supervisor import Request, Supervisor


def run(cfg: Config, allow_root: bool = False) -> int:
    """Run until SIGTERM/SIGINT; return the exit status (0 after a clean shutdown).

    The guard rails run first: a refusal (UnsafeHost) happens before any file is written or
    any process is spawned."""
    guards.enforce(cfg, allow_root)
    return asyncio.run(_main(cfg, allow_root))


async def _main(cfg: Config, allow_root: bool) -> int:
    for path in (cfg.logs.dir, cfg.state_dir):
        path.mkdir(parents=True, exist_ok=True, mode=0o750)
    events = EventLog(cfg.logs.dir, cfg.logs.max_bytes, cfg.logs.keep)
    metrics = Metrics()
    backend = backends.for_config(cfg)
    metrics.set_info(backend.name)
    output = ServerOutput(RotatingFile(cfg.logs.dir / "server.log", cfg.logs.max_bytes,
                                       cfg.logs.keep, mode=0o640),
                          cfg.server.output_buffer, backend.content_line,
                          cfg.server.content_lines)
    supervisor = Supervisor(cfg, backend, events, metrics, output=output)
    supervisor.add_gate(memory.gate(memory.Preflight(cfg), events))
    gateway = Gateway(cfg, supervisor, metrics)
    control = ControlServer(cfg.control_socket, supervisor)
    control.add_action("upgrade", upgrade.event_action(events))  # `sovereignd upgrade` steps
    loop = asyncio.get_running_loop()
    # Handlers only record the request; the supervisor's loop acts on it.
    loop.add_signal_handler(signal.SIGTERM, supervisor.request, Request.SHUTDOWN, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, supervisor.request, Request.SHUTDOWN, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, supervisor.request, Request.RESET, "SIGHUP")
    try:
        await gateway.start()
        await control.start()
        events.emit("daemon_start", version=__version__, pid=os.getpid(), uid=os.getuid(),
                    config=str(cfg.source), config_sha256=cfg.digest, backend=backend.name,
                    listen=cfg.gateway.listen, python=sys.version.split()[0])
        await supervisor.run()
    finally:
        await control.stop()
        await gateway.stop()
        events.emit("daemon_stop", pid=os.getpid(), state=supervisor.state.value)
        events.close()
        output.close()
    return 0
