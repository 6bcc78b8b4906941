"""`sovereignd upgrade`: a new server venv beside the old one, frozen and baselined, switched
in atomically, proven by a fresh READY (a new server that answered a canary), or rolled back.

Layout: server.venv names a symlink, e.g. /opt/sovereignd/server-venv -> server-venvs/<name>;
each version lives in its own folder next to the others, so switching is one rename of a
symlink (os.replace of a new link over the old) and rolling back is the same rename back.

Events: the daemon is the only writer of events.log, so each step is sent to it through the
control socket (action `upgrade`) and it records `{"event": "upgrade", "step": ...}` in order
with the state changes the restart causes. An upgrade therefore needs the daemon running; it
refuses to start otherwise, before anything is built or switched.

The frozen baseline (environment.frozen and its .sha256) is written with the same freezer as
`sovereignd baseline` (integrity.venv.freeze, `pip freeze --all` format).

Several models: the upgrade replaces ONE venv, the one every model with a server.venv runs
from (or, with `--model NAME`, the one NAME runs from), and with it every model that runs from
that venv (models often share one; each symlink naming it is switched). Models running from
other venvs are refused without `--model` (one new venv cannot be right for two different
ones). The models are restarted one at a time (a rolling restart: the others keep serving),
each proven by a fresh READY; an on_demand model that is not running is not started, and takes
the new venv at its next start. If one model does not become READY, the venv is rolled back
for all of them and the error says which model failed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from sovereignd.config import Config
from sovereignd.errors import SovereigndError
from sovereignd.fsutil import atomic_write
from sovereignd.gateway import control, drain
from sovereignd.integrity import locks, software
from sovereignd.integrity.frozen import render_companion
from sovereignd.integrity.venv import freeze
from sovereignd.logs.eventlog import EventLog

STEPS = frozenset({"begin", "build", "built", "baseline", "drain", "drained", "switch",
                   "restart", "ready", "done", "failed", "rollback", "rolled_back",
                   "rollback_failed", "resume"})
_LEVELS = {"failed": "error", "rollback": "warning", "rolled_back": "warning",
           "rollback_failed": "critical"}


class UpgradeFailed(SovereigndError):
    """The upgrade did not complete; the message says whether the old venv serves again."""


# --- the daemon's side: the control action that records the steps -------------------------


def event_action(events: EventLog) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The control-socket action `upgrade`: record one step as an event. Only known steps and
    plain values are accepted; the level follows from the step."""

    def action(body: dict[str, Any]) -> dict[str, Any]:
        step = body.get("step")
        if step not in STEPS:
            return {"ok": False, "error": f"unknown upgrade step {step!r}"}
        fields = {k: v for k, v in body.items()
                  if k not in ("step", "event", "level", "ts") and isinstance(k, str)
                  and (v is None or isinstance(v, str | int | float | bool))}
        events.emit("upgrade", level=_LEVELS.get(str(step), "info"), step=step, **fields)
        return {"ok": True, "message": f"recorded {step}"}

    return action


# --- freezing ---------------------------------------------------------------------------------


def freeze_venv(venv: Path) -> bytes:
    """The venv's installed set as `baseline` writes it (`pip freeze --all` format), read from
    its package metadata without running its Python."""
    if not freeze(venv).strip():
        raise UpgradeFailed(f"{venv} holds no installed distributions besides pip's own (no "
                            "lib/python3*/site-packages/*.dist-info): not a built server venv")
    return freeze(venv, all=True).encode()


def companion_bytes(frozen: Path, data: bytes) -> bytes:
    """The .sha256 companion, as `shasum -a 256 NAME` run beside the frozen file writes it."""
    return render_companion(frozen, data)


@dataclass(frozen=True)
class SavedFile:
    """A file's bytes, mode and owner, to put back exactly on rollback (None: it did not exist)."""

    path: Path
    data: bytes | None
    mode: int = 0o640
    owner: tuple[int, int] | None = None

    @classmethod
    def read(cls, path: Path) -> SavedFile:
        try:
            st = path.stat()
            return cls(path, path.read_bytes(), st.st_mode & 0o777, (st.st_uid, st.st_gid))
        except FileNotFoundError:
            # A new file takes its folder's group (root:<account> 0750 for baselines), so the
            # account can read it and not write it.
            parent = path.parent.stat()
            return cls(path, None, 0o640, (0, parent.st_gid))

    def write(self, data: bytes) -> None:
        """New bytes with this file's mode and owner (readable by the account as before)."""
        owner = self.owner if self.owner is not None and os.geteuid() == 0 else None
        atomic_write(self.path, data, mode=self.mode, owner=owner)

    def restore(self) -> None:
        if self.data is None:
            self.path.unlink(missing_ok=True)
        else:
            self.write(self.data)


# --- the symlink ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The symlink server.venv names, what it points to, and the folder of versions."""

    link: Path
    current: str      # the link's text, exactly, to restore it exactly
    versions: Path

    @property
    def current_path(self) -> Path:
        """The venv folder the link points to now."""
        return (self.link.parent / self.current).resolve()


def read_layout(link: Path) -> Layout:
    """The symlink layout server.venv must follow; UpgradeFailed saying how to convert."""
    if not link.is_symlink():
        raise UpgradeFailed(
            f"server.venv ({link}) is not a symlink; an upgrade switches a symlink to a "
            f"versioned venv. Convert once: mkdir -p {link.parent}/server-venvs && mv {link} "
            f"{link.parent}/server-venvs/<name> && ln -s server-venvs/<name> {link}")
    return Layout(link, str(link.readlink()), link.parent / "server-venvs")


@dataclass(frozen=True)
class Venv:
    """The venv an upgrade replaces: the models that run from it (in config order), each
    symlink naming it, and each distinct frozen baseline that approves it."""

    models: tuple[str, ...]
    layouts: tuple[Layout, ...]
    frozen: tuple[Path, ...]
    files_check: bool
    hash_workers: int

    @property
    def current_path(self) -> Path:
        return self.layouts[0].current_path


def select_venv(cfg: Config, model: str | None = None) -> Venv:
    """The venv to upgrade: the one `model` runs from, or the one every model with a
    server.venv runs from; with it every model sharing it. UpgradeFailed when there is none,
    when `model` is not served, or when models run from different venvs and `model` is None."""
    specs = cfg.models
    if model is not None and model not in specs:
        raise UpgradeFailed(f"--model {model!r}: no such model here (served: "
                            f"{', '.join(specs) or 'none'})")
    chosen = [specs[model]] if model is not None else list(specs.values())
    with_venv = [m for m in chosen if m.server.venv is not None]
    if not with_venv:
        which = f"models.{model}.server.venv" if model is not None and len(specs) > 1 \
            else "server.venv"
        raise UpgradeFailed(f"{which} is not set: an upgrade switches the symlink it names")
    layouts = {m.name: read_layout(m.server.venv) for m in specs.values()
               if m.server.venv is not None and (m in with_venv or m.server.venv.is_symlink())}
    current = {n: lay.current_path for n, lay in layouts.items()}
    venvs = {current[m.name] for m in with_venv}
    if len(venvs) > 1:
        shown = "; ".join(f"{m.name}: {current[m.name]}" for m in with_venv)
        raise UpgradeFailed(f"the models run from {len(venvs)} different venvs ({shown}); one "
                            "new venv cannot replace them all: name one with --model NAME")
    venv = venvs.pop()
    names = tuple(n for n in specs if current.get(n) == venv)  # every model sharing it
    links: dict[Path, Layout] = {}
    for n in names:
        links.setdefault(layouts[n].link, layouts[n])
    frozen = dict.fromkeys(specs[n].environment.frozen for n in names
                           if specs[n].environment.frozen is not None)
    return Venv(names, tuple(links.values()), tuple(p for p in frozen if p is not None),
                any(specs[n].environment.files_check for n in names),
                specs[names[0]].integrity.hash_workers)


def switch_link(link: Path, target: str) -> None:
    """Point `link` at `target` atomically: a new symlink beside it, renamed over it."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


# --- the upgrade ------------------------------------------------------------------------------


def _parse_ts(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


@dataclass
class Upgrade:
    """One upgrade of the server venv, step by step; `run()` does it all."""

    cfg: Config
    name: str
    requirements: Path | None = None
    prebuilt: Path | None = None
    python: str = "python3"
    #: The model whose venv is upgraded (None: the one venv every model runs from).
    model: str | None = None
    uninstall: Sequence[str] = ()
    #: Build from requirements without --hash lines (the operator insists): pip then installs
    #: whatever the index serves for each pin.
    allow_unhashed: bool = False
    timeout: float = 600.0
    #: Seconds the host keeps serving while drained before the switch (0: no drain), so a
    #: load balancer moves traffic away first (see gateway.drain).
    drain_grace: float = drain.DEFAULT_GRACE
    poll: float = 0.25
    say: Callable[[str], None] = print
    log: list[dict[str, Any]] = field(default_factory=list)

    def step(self, step: str, **fields: Any) -> None:
        """Record a step in the daemon's event log (and on the terminal)."""
        self.log.append({"step": step, **fields})
        detail = " ".join(f"{k}={v}" for k, v in fields.items())
        self.say(f"upgrade: {step} {detail}".rstrip())
        try:
            control.request(self.cfg, "upgrade", timeout=10.0, step=step, **fields)
        except SovereigndError as exc:
            self.say(f"upgrade: could not record {step} in the event log: {exc}")

    def run(self) -> Path:
        """Upgrade; return the new venv. UpgradeFailed (after rollback) when a model that runs
        from it is not READY on it."""
        venv = select_venv(self.cfg, self.model)
        try:
            before = control.fetch_status(self.cfg)
        except SovereigndError as exc:
            raise UpgradeFailed(f"nothing was changed: an upgrade needs the running daemon, "
                                f"to restart the server and see it READY ({exc})") from exc
        layout = venv.layouts[0]
        target = self._target(layout)
        if target.resolve() == venv.current_path:
            raise UpgradeFailed(f"{target} is already the server venv ({layout.link})")
        skipped = [n for n in self.cfg.models if n not in venv.models]
        if skipped and self.model is None:
            self.say(f"upgrade: not upgraded (server.venv not set): {', '.join(skipped)}")
        self.step("begin", name=self.name, venv=str(target), previous=str(venv.current_path),
                  link=str(layout.link), models=",".join(venv.models),
                  state=before.get("state"))
        saved = [SavedFile.read(p) for f in venv.frozen
                 for p in (f, f.with_name(f.name + ".sha256"))]
        try:
            self._build(target)
            self._baseline(target, venv, saved)
        except (UpgradeFailed, OSError) as exc:
            for f in saved:
                f.restore()  # a half-written baseline must not outlive the attempt
            why = str(exc) if isinstance(exc, UpgradeFailed) else f"{exc.strerror}: {exc}"
            self.step("failed", name=self.name, reason=why, switched=False)
            raise UpgradeFailed(f"{why}; nothing was switched") from exc
        drained = self._drain()
        switched_at = time.time()
        for lay in venv.layouts:
            link_text = os.path.relpath(target, lay.link.parent) \
                if lay.versions in target.parents else str(target)
            switch_link(lay.link, link_text)
            self.step("switch", previous=lay.current, to=link_text, link=str(lay.link))
        pids: dict[str, Any] = {}
        try:
            for name in venv.models:  # one at a time: the others keep serving meanwhile
                try:
                    pids[name] = self._restart_and_wait(name, f"upgrade to {self.name}")
                except UpgradeFailed as exc:
                    self._rollback(venv, saved, name, str(exc))
        finally:
            if drained:
                self._resume()
        self.step("done", name=self.name, models=",".join(venv.models),
                  pid=",".join(f"{n}={p}" for n, p in pids.items() if p is not None),
                  seconds=round(time.time() - switched_at, 3))
        return target

    def _drain(self) -> bool:
        """Drain the host before the restart; True if this upgrade began the drain (and so
        ends it). A host drained by the operator already stays drained afterwards; a drain
        left by an upgrade that never finished (saved across daemon restarts) is taken over."""
        if self.drain_grace <= 0:
            return False
        current = drain.drain_status(self.cfg).get("drain")
        if isinstance(current, dict) and current.get("by") != "upgrade":
            self.step("drain", skipped="the host is drained already; it stays drained")
            return False
        control.call(self.cfg, "drain", grace=self.drain_grace,
                     reason=f"upgrade to {self.name}", by="upgrade")
        self.step("drain", grace_s=self.drain_grace)
        try:
            state = drain.wait_drained(self.cfg, self.drain_grace
                                       + self.cfg.gateway.upstream_timeout, self.say)
            self.step("drained", in_flight=0, since=str(state.get("since")))
        except SovereigndError as exc:  # requests still running: the restart ends them
            self.step("drained", incomplete=str(exc))
        return True

    def _resume(self) -> None:
        try:
            control.call(self.cfg, "resume", reason=f"upgrade to {self.name} ended")
            self.step("resume")
        except SovereigndError as exc:
            self.say(f"upgrade: could not resume (run `sovereignd resume`): {exc}")

    def _target(self, layout: Layout) -> Path:
        if self.prebuilt is not None:
            if not (self.prebuilt / "bin").is_dir():
                raise UpgradeFailed(f"{self.prebuilt} has no bin/ folder: not a venv")
            return self.prebuilt.absolute()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", self.name):
            raise UpgradeFailed(f"--name {self.name!r}: use letters, digits and . _ + -")
        return layout.versions / self.name

    def _build(self, target: Path) -> None:
        if self.prebuilt is not None:
            self.step("build", venv=str(target), prebuilt=True)
            return
        if self.requirements is None:
            raise UpgradeFailed("give --requirements FILE to build the new venv, or --venv DIR "
                                "for one built already")
        if target.exists():
            raise UpgradeFailed(f"{target} exists already; pick another --name, or pass it "
                                "as --venv if it is complete")
        missing = locks.unhashed(self.requirements)
        if missing and not self.allow_unhashed:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more"
                                              if len(missing) > 5 else "")
            raise UpgradeFailed(f"{self.requirements} pins packages without --hash ({shown}): "
                                "write a lock with `uv pip compile --generate-hashes`, or pass "
                                "--allow-unhashed to install whatever the index serves")
        self.step("build", venv=str(target), requirements=str(self.requirements))
        t0 = time.monotonic()
        target.parent.mkdir(parents=True, exist_ok=True)
        pip = [str(target / "bin" / "pip"), "--disable-pip-version-check", "--quiet"]
        try:
            self._call([self.python, "-m", "venv", str(target)])
            # A lock lists every package: --no-deps installs exactly it (as pip-sync does).
            locked = [] if missing else ["--require-hashes", "--no-deps"]
            self._call([*pip, "install", *locked, "-r", str(self.requirements)])
            if self.uninstall:
                self._call([*pip, "uninstall", "-y", *self.uninstall])
        except UpgradeFailed:
            shutil.rmtree(target, ignore_errors=True)  # never leave a half-built version
            raise
        self.step("built", venv=str(target), seconds=round(time.monotonic() - t0, 1))

    @staticmethod
    def _call(argv: list[str]) -> None:
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise UpgradeFailed(f"building the venv failed at `{' '.join(argv)}` (exit "
                                f"{res.returncode}): {res.stderr.strip()[-500:]}")

    def _baseline(self, target: Path, venv: Venv, saved: list[SavedFile]) -> None:
        """Each distinct frozen baseline of the venv's models rewritten for the new venv
        (hashed once, however many models share it)."""
        if not saved:
            self.step("baseline", skipped="environment.frozen is not set")
            return
        data = freeze_venv(target)
        approved = None
        if venv.files_check:
            try:  # the new venv file by file, approved by each frozen file (see software)
                approved = software.create(target, workers=venv.hash_workers)
            except SovereigndError as exc:
                raise UpgradeFailed(str(exc)) from exc
        for frozen, companion in zip(saved[0::2], saved[1::2], strict=True):
            written = data
            if approved is not None:
                files_path = software.path_for_frozen(frozen.path)
                saved.append(SavedFile.read(files_path))
                written = software.link_line(files_path,
                                             software.write(files_path, approved)) + data
            frozen.write(written)
            companion.write(companion_bytes(frozen.path, written))
            self.step("baseline", frozen=str(frozen.path),
                      sha256=hashlib.sha256(written).hexdigest(),
                      packages=written.count(b"\n"))

    def _restart_and_wait(self, model: str, reason: str) -> int | None:
        """Restart `model` through the control socket; wait for READY from a server started
        after the request: its pid, or None when the model is not running (an on_demand model
        that is stopped takes the new venv at its next start). FATAL after the request, or no
        READY within the timeout, is a failure."""
        before = _model_status(control.fetch_status(self.cfg), model)
        old_pid = (before.get("server") or {}).get("pid")
        if before.get("start") == "on_demand" and before.get("state") == "STOPPED":
            self.step("restart", model=model, skipped="not running (start: on_demand); its "
                      "next start runs the venv the link names then")
            return None
        since = time.time()
        try:
            control.request(self.cfg, "restart", reason=reason, model=model)
        except SovereigndError as exc:
            raise UpgradeFailed(f"model {model}: the restart was refused: {exc}") from exc
        self.step("restart", model=model, reason=reason, previous_pid=old_pid)
        deadline = time.monotonic() + self.timeout
        last: dict[str, Any] = before
        while time.monotonic() < deadline:
            try:
                last = _model_status(control.fetch_status(self.cfg), model)
            except SovereigndError:
                time.sleep(self.poll)  # the daemon may be busy restarting; ask again
                continue
            state, changed = last.get("state"), _parse_ts(str(last.get("since")))
            server = last.get("server") or {}
            # `since` is stamped to the millisecond; allow for that rounding.
            if state == "READY" and changed >= since - 0.001 and server.get("pid") != old_pid:
                self.step("ready", model=model, pid=server.get("pid"),
                          seconds=round(time.time() - since, 3))
                pid = server.get("pid")
                return pid if isinstance(pid, int) else None
            if state == "FATAL" and changed >= since - 0.001:
                raise UpgradeFailed(f"model {model} went FATAL: {last.get('reason')}")
            time.sleep(self.poll)
        raise UpgradeFailed(f"model {model}: no READY within {self.timeout:g}s (last state "
                            f"{last.get('state')}: {last.get('reason')})")

    def _rollback(self, venv: Venv, saved: list[SavedFile], model: str, why: str) -> NoReturn:
        self.step("failed", name=self.name, model=model, reason=why)
        self.step("rollback", to=venv.layouts[0].current, model=model)
        for lay in venv.layouts:
            switch_link(lay.link, lay.current)
        for f in saved:
            f.restore()
        pids: list[str] = []
        try:  # every model of the venv: those restarted already run the new one
            for name in venv.models:
                pid = self._restart_and_wait(name, f"rollback of {self.name}")
                if pid is not None:
                    pids.append(f"{name}={pid}")
        except UpgradeFailed as exc:
            self.step("rollback_failed", model=model, reason=str(exc))
            raise UpgradeFailed(
                f"the upgrade to {self.name} failed for model {model} ({why}) and so did the "
                f"rollback to {venv.current_path} ({exc}); the symlink and baseline are back, "
                "the server is not serving: see `sovereignd status` and events.log") from exc
        self.step("rolled_back", to=str(venv.current_path), model=model, pid=",".join(pids))
        raise UpgradeFailed(f"the upgrade to {self.name} failed for model {model} ({why}); "
                            f"rolled back to {venv.current_path}, which serves again")


def _model_status(status: dict[str, Any], model: str) -> dict[str, Any]:
    """One model's part of /status (`models: {NAME: ...}`; the single form has it too)."""
    models = status.get("models") or {}
    one = models.get(model)
    if not isinstance(one, dict):
        raise UpgradeFailed(f"the daemon does not serve model {model!r} (serves: "
                            f"{', '.join(models) or 'none'}): was the configuration changed?")
    return one
