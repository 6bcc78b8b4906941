"""The control socket: operator commands to a running daemon (`status`, `restart`, ...).

A Unix socket in `state_dir`, mode 0600: whoever can open it is the service account or
root, so file permissions are the authorisation (supervisorctl's unix_http_server). The CLI
falls back to GET /status on a loopback gateway when the socket cannot be opened.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from sovereignd.config import Config
from sovereignd.errors import SovereigndError
from sovereignd.supervision.models import Models
from sovereignd.supervision.supervisor import Request, Supervisor
from sovereignd.textsafe import escape

Action = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    """Serves the control socket inside the daemon."""

    def __init__(self, path: Path, supervisor: Supervisor | Models) -> None:
        self.path = path
        self.supervisor = supervisor
        self.actions: dict[str, Action] = {
            "restart": self._restart,
            "reset": self._reset,
        }
        # Parts of /status kept outside the supervisor (drain, keys), by their key.
        self.status_parts: dict[str, Callable[[], Any]] = {}
        self.app = web.Application(client_max_size=64 * 1024)
        self.app.router.add_get("/status", self._status)
        self.app.router.add_post("/{action}", self._action)
        self._runner: web.AppRunner | None = None

    def add_action(self, name: str, action: Action) -> None:
        self.actions[name] = action

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a previous run; one daemon per state_dir
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        old = os.umask(0o177)
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        finally:
            os.umask(old)
        self.path.chmod(0o600)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _status(self, _request: web.Request) -> web.Response:
        status = self.supervisor.status()
        for name, part in self.status_parts.items():  # e.g. "drain"
            status[name] = part()
        return web.json_response(status, dumps=_dumps)

    async def _action(self, request: web.Request) -> web.Response:
        name = request.match_info["action"]
        action = self.actions.get(name)
        if action is None:
            return web.json_response({"error": f"unknown action {name!r}"}, status=404)
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return web.json_response({"error": "body must be JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        return web.json_response(action(body), dumps=_dumps)

    def _restart(self, body: dict[str, Any]) -> dict[str, Any]:
        reason = str(body.get("reason") or "operator request")
        model = body.get("model")
        if model is None:
            self.supervisor.request(Request.RESTART, f"operator: {reason}")
            return {"ok": True,
                    "message": f"restart requested (state was {self.supervisor.state})"}
        # One model of several: only its server restarts.
        if not isinstance(self.supervisor, Models) or model not in self.supervisor.models:
            served = (", ".join(self.supervisor.models) if isinstance(self.supervisor, Models)
                      else "one model")
            return {"ok": False, "error": f"no model {model!r} is served here ({served})"}
        target = self.supervisor.models[model]
        if target.supervisor is None:
            return {"ok": False, "error": f"model {model} is not started (start: "
                                            f"{target.spec.start}); nothing to restart"}
        self.supervisor.request(Request.RESTART, f"operator: {reason}", model=str(model))
        return {"ok": True, "message": f"restart of {model} requested (state was "
                                       f"{target.state})"}

    def _reset(self, body: dict[str, Any]) -> dict[str, Any]:
        reason = str(body.get("reason") or "operator reset")
        self.supervisor.request(Request.RESET, f"operator: {reason}")
        return {"ok": True, "message": "reset requested"}


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


# --- client side (the CLI) -----------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def _call(conn: http.client.HTTPConnection, method: str, path: str,
          body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = orjson.dumps(body) if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = resp.read()
    try:
        result = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise SovereigndError(f"the daemon answered {resp.status} with non-JSON") from exc
    if resp.status >= 400:
        raise SovereigndError(f"the daemon refused: {result.get('error', result)}")
    if not isinstance(result, dict):
        raise SovereigndError("the daemon answered with something other than a JSON object")
    return result


def request(cfg: Config, action: str, timeout: float = 10.0, **body: Any) -> str:
    """Send an action to the running daemon through the control socket; its message."""
    result = call(cfg, action, timeout, **body)
    return str(result.get("message", result))


def call(cfg: Config, action: str, timeout: float = 10.0, **body: Any) -> dict[str, Any]:
    """Send an action to the running daemon through the control socket; its JSON answer.
    SovereigndError when the daemon cannot be reached or the action says `"ok": false`."""
    conn = _UnixConnection(cfg.control_socket, timeout)
    try:
        result = _call(conn, "POST", f"/{action}", body)
    except FileNotFoundError as exc:
        raise SovereigndError(f"no daemon is running for {cfg.source} (no control socket at "
                              f"{cfg.control_socket}); start it with `sovereignd run`") from exc
    except PermissionError as exc:
        raise SovereigndError(f"cannot open {cfg.control_socket}: permission denied — run "
                              "this as root or as the service account") from exc
    except ConnectionRefusedError as exc:
        raise SovereigndError(f"the daemon is not answering on {cfg.control_socket} (stale "
                              "socket of a stopped daemon?)") from exc
    finally:
        conn.close()
    if result.get("ok") is False:
        raise SovereigndError(f"the daemon refused {action}: {result.get('error')}")
    return result


def fetch_status(cfg: Config, timeout: float = 5.0) -> dict[str, Any]:
    """The daemon's /status, through the control socket or else a loopback gateway."""
    errors = []
    connections: list[tuple[str, Callable[[], http.client.HTTPConnection]]] = [
        (str(cfg.control_socket), lambda: _UnixConnection(cfg.control_socket, timeout)),
        (f"http://{cfg.gateway.listen}/status",
         lambda: http.client.HTTPConnection(*cfg.listen, timeout=timeout))]
    for where, connect in connections:
        conn = connect()
        try:
            return _call(conn, "GET", "/status")
        except OSError as exc:
            errors.append(f"{where}: {exc.strerror or exc}")
        finally:
            conn.close()
    raise SovereigndError("cannot reach the daemon (" + "; ".join(errors) + "); is it running?")


def status_json(status: dict[str, Any]) -> str:
    return orjson.dumps(status, option=orjson.OPT_INDENT_2).decode()


def render_status(st: dict[str, Any]) -> str:
    """/status for a human: the state first, then what explains it; with several models,
    the state of them together, then each model's own block."""
    models = st.get("models") or {}
    drain = st.get("drain")
    # A drained host says so first: /readyz is 503 for it whatever the models' states.
    head = [] if not drain else [
        f"drain:     DRAINING since {drain.get('since')} ({drain.get('reason')}"
        + (f", by {drain['by']}" if drain.get("by") == "upgrade" else "") + "); "
        + ("refusing new requests" if drain.get("refusing") else
           f"still serving for {drain.get('grace_left_s')}s")
        + f", {drain.get('in_flight')} in flight; `sovereignd resume` ends it"]
    if drain and drain.get("restored"):
        head.append(f"           kept across a daemon restart (restored at {drain['restored']})")
    if len(models) <= 1:
        return "\n".join(escape(line) for line in head + _model_lines(st))
    lines = [*head, f"state:     {st.get('state')}", f"reason:    {st.get('reason')}"]
    for name, model in models.items():
        lines.append(f"model {name} (start: {model.get('start')}):")
        lines.extend("  " + line for line in _model_lines(model)[:-1])
    lines.append(f"version:   sovereignd {st.get('version')}")
    return "\n".join(escape(line) for line in lines)  # reasons may quote server output


def _model_lines(st: dict[str, Any]) -> list[str]:
    since = f"  (since {st['since']})" if st.get("since") else ""
    lines = [f"state:     {st.get('state')}{since}", f"reason:    {st.get('reason')}"]
    model = st.get("model") or {}
    lines.append(f"model:     {model.get('name')}  ({model.get('path')})")
    server = st.get("server")
    if server:
        lines.append(f"server:    pid {server.get('pid')}, up {server.get('uptime_s')}s, "
                     f"{server.get('processes')} process(es)")
    else:
        lines.append("server:    not running")
    if st.get("restarts") is None:  # an on_demand model not started since the daemon began
        lines.append("restarts:  none (not started yet)")
    else:
        lines.append(f"restarts:  {st.get('restarts')}  (failures in window: "
                     f"{st.get('failures_in_window')})")
    last = st.get("last_exit")
    if last:
        lines.append(f"last exit: {last.get('at')}  {last.get('message')}")
        if last.get("mitigation"):
            lines.append(f"           what to do: {last.get('mitigation')}")
    for name, reason in (st.get("degraded") or {}).items():
        lines.append(f"degraded:  {name}: {reason}")
    for name in ("integrity", "environment", "self", "requests", "memory"):
        if isinstance(st.get(name), dict):
            summary = st[name].get("summary") or st[name].get("result")
            lines.append(f"{name + ':':<13}{summary}")
            if st[name].get("python"):
                lines.append(f"{'':<13}interpreter {st[name]['python']}")
    lines.append(f"version:   sovereignd {st.get('version')} ({st.get('backend')})")
    return lines
