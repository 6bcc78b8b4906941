"""Guard rails: who the daemon runs as, and files its account must not be able to change.

The first tests judge synthetic accounts against real files; the `root` tier creates a real
system account, runs `sovereignd run` as it with the stand-in server, and checks uids, owners,
modes and refusals for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from sovereignd import config
from sovereignd.service import guardrails
from tests.accounts import (
    SystemUser,
    as_user,
    install_sources,
    python_for,
    require_root,
    shared_dir,
    system_user,
    user_env,
)
from tests.harness import free_port, http
from tests.helpers import cli_argv, cli_env, run_cli, wait_for


def write_config(path: Path, body: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture
def protected(tmp_path: Path) -> tuple[Path, config.Config]:
    """A configuration whose manifest and frozen environment live in `baseline/`."""
    base = tmp_path / "host"
    (base / "model").mkdir(parents=True)
    (base / "model" / "config.json").write_text("{}")
    baseline = base / "baseline"
    baseline.mkdir()
    (baseline / "model.sha256").write_text("")
    (baseline / "frozen.txt").write_text("")
    path = write_config(base / "etc" / "sovereignd.yaml", {
        "server": {"model": str(base / "model")},
        "integrity": {"manifest": str(baseline / "model.sha256")},
        "environment": {"frozen": str(baseline / "frozen.txt")},
        "logs": {"dir": str(base / "logs")}})
    return base, config.load(path)


SVC = guardrails.Account("svc", 4242, frozenset({4242, 0}))  # in group 0, like a careless setup


def test_protected_files_writable_through_a_group_or_by_all_are_refused(
        protected: tuple[Path, config.Config]) -> None:
    base, cfg = protected
    assert guardrails.check_protected(cfg, SVC) == []
    (base / "baseline" / "model.sha256").chmod(0o664)   # group 0, which svc is in
    (base / "baseline").chmod(0o757)                     # anyone may replace files in it
    problems = {p.path: p for p in guardrails.check_protected(cfg, SVC)}
    manifest = problems[str(base / "baseline" / "model.sha256")]
    assert "integrity manifest is writable by group root, which svc is in" in manifest.message
    assert "mode 0664" in manifest.message and manifest.fix.startswith("chmod g-w ")
    folder = problems[str(base / "baseline")]
    assert "writable by every account" in folder.message and folder.fix.startswith("chmod o-w")


def test_a_sticky_folder_is_safe_only_for_entries_the_account_does_not_own(
        tmp_path: Path) -> None:
    """/tmp-like folders: others can create entries but not replace root's."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    cfg_path = write_config(sticky / "etc" / "sovereignd.yaml", {
        "server": {"model": str(tmp_path)}, "logs": {"dir": str(tmp_path / "logs")},
        "integrity": {"manifest": str(sticky / "missing.sha256")}})
    problems = guardrails.check_protected(config.load(cfg_path), SVC)
    # etc/ exists and is root's: safe; the manifest does not exist: svc could create it.
    assert [p.path for p in problems] == [str(sticky)]
    assert "integrity manifest" in problems[0].message


def test_log_folder_open_to_others_and_root_without_the_switch_are_refused(
        protected: tuple[Path, config.Config]) -> None:
    base, cfg = protected
    (base / "logs").mkdir(mode=0o755)
    (base / "logs").chmod(0o755)
    [logs] = guardrails.check_logs(cfg)
    assert "open to every account (mode 0755)" in logs.message
    assert logs.fix == f"chmod o-rwx {base / 'logs'}"
    root = guardrails.Account("root", 0, frozenset({0}))
    [who] = guardrails.check_identity(cfg, root, allow_root=False)
    assert "running as root" in who.message and "--allow-root" in who.fix
    assert guardrails.check_identity(cfg, root, allow_root=True) == []
    named = config.loads(cfg.source.read_bytes() + b"daemon: {user: _sovereignd}\n",
                         cfg.source)
    [other] = guardrails.check_identity(named, guardrails.Account("bob", 1000, frozenset()), False)
    assert "daemon.user is _sovereignd, but the daemon runs as bob" in other.message


# --- root tier: a real service account ----------------------------------------------------


@dataclass
class Host:
    """A small production-like layout under a folder every account can reach."""

    base: Path
    user: SystemUser
    python: str
    env: dict[str, str]
    config: Path
    port: int
    logs: Path
    state: Path
    manifest: Path


def chown(path: Path, user: SystemUser, mode: int) -> None:
    os.chown(path, user.uid, user.gid)
    path.chmod(mode)


@pytest.fixture
def host() -> Iterator[Host]:
    require_root()
    with system_user() as user, shared_dir() as base:
        src = install_sources(base)
        env = user_env(src)
        python = python_for(user, env["PYTHONPATH"])
        (base / "model").mkdir(mode=0o755)
        config_json = b'{"architectures": ["LlamaForCausalLM"]}'
        (base / "model" / "config.json").write_bytes(config_json)
        baseline = base / "baseline"
        baseline.mkdir(mode=0o755)
        manifest = baseline / "model.sha256"  # the approved weights: what the model holds
        manifest.write_text(f"{hashlib.sha256(config_json).hexdigest()}  ./config.json\n")
        (baseline / "frozen.txt").write_text("")
        logs, state = base / "logs", base / "state"
        for d in (logs, state):
            d.mkdir()
            chown(d, user, 0o750)
        (state / "control.json").write_text(json.dumps({"default": {}}))
        port = free_port()
        cfg = write_config(base / "etc" / "sovereignd.yaml", {
            "daemon": {"user": user.name, "state_dir": str(state)},
            "server": {"command": [python, str(src / "fake_vllm.py")],
                       "model": str(base / "model"), "port": free_port(), "drain": "1s",
                       "stop_grace": "3s", "start_timeout": "20s",
                       "env": {"FAKE_VLLM_CONTROL": str(state / "control.json")}},
            "gateway": {"listen": f"127.0.0.1:{port}", "keys_file": str(base / "etc" / "keys")},
            "health": {"interval": "200ms", "timeout": "500ms", "startup_poll": "100ms",
                       "canary_interval": "1s", "canary_timeout": "2s"},
            "integrity": {"manifest": str(manifest)},
            "environment": {"frozen": str(baseline / "frozen.txt")},
            "logs": {"dir": str(logs)}})
        cfg.chmod(0o644)
        yield Host(base, user, python, env, cfg, port, logs, state, manifest)


def start_as(h: Host) -> subprocess.Popen[bytes]:
    out = (h.base / "daemon.out").open("ab")
    err = (h.base / "daemon.err").open("ab")
    with out, err:
        return subprocess.Popen(as_user(h.user, [h.python, "-m", "sovereignd", "run",
                                                 "--config", str(h.config)]),
                                env=h.env, stdout=out, stderr=err, start_new_session=True)


def run_as(h: Host, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(as_user(h.user, [h.python, "-m", "sovereignd", "run", "--config",
                                           str(h.config)]),
                          env=h.env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def status(h: Host, proc: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
    if proc is not None and proc.poll() is not None:
        raise AssertionError(f"the daemon exited with {proc.returncode}: "
                             + (h.base / "daemon.err").read_text()[-3000:])
    code, body, _ = http("GET", f"http://127.0.0.1:{h.port}/status", timeout=5)
    assert code == 200
    result: dict[str, Any] = json.loads(body)
    return result


def owner_mode(path: Path) -> tuple[str, int]:
    st = path.lstat()
    return pwd.getpwuid(st.st_uid).pw_name, st.st_mode & 0o7777


@pytest.mark.root
def test_daemon_and_server_run_as_the_service_account_with_intended_modes(host: Host) -> None:
    """The real path: a system account, root-owned configuration and baselines, logs and
    state owned by the account (0750); the server runs with the account's uid."""
    proc = start_as(host)
    try:
        st = wait_for(lambda: (s := status(host, proc))["state"] == "READY" and s, 20,
                      what="READY as the service account")
        server = psutil.Process(st["server"]["pid"])
        assert server.uids().real == server.uids().effective == host.user.uid
        assert psutil.Process(proc.pid).uids().real == host.user.uid
        assert st["daemon"]["pid"] == proc.pid
        name = host.user.name
        assert owner_mode(host.logs / "events.log") == (name, 0o640)
        assert owner_mode(host.logs / "server.log") == (name, 0o640)
        assert owner_mode(host.state / "control.sock") == (name, 0o600)
        pid_owner, pid_mode = owner_mode(host.state / "server.pid")
        assert pid_owner == name and pid_mode & 0o022 == 0
        assert owner_mode(host.logs) == (name, 0o750)
        assert owner_mode(host.config) == ("root", 0o644)
        events = [json.loads(ln) for ln in (host.logs / "events.log").read_text().splitlines()]
        start = next(e for e in events if e["event"] == "daemon_start")
        assert start["uid"] == host.user.uid
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, (host.base / "daemon.err").read_text()[-2000:]
    assert not [p for p in psutil.process_iter(["uids"])
                if p.info["uids"] and p.info["uids"].real == host.user.uid]


@pytest.mark.root
def test_a_baseline_the_account_can_change_is_refused_before_anything_starts(
        host: Host) -> None:
    chown(host.manifest, host.user, 0o644)
    t0 = time.monotonic()
    res = run_as(host)
    assert res.returncode == 78, res.stderr
    assert time.monotonic() - t0 < 10
    assert f"{host.manifest}: the integrity manifest is owned by {host.user.name}" in res.stderr
    assert f"chown root {host.manifest}" in res.stderr
    assert not (host.logs / "events.log").exists()           # nothing written
    assert not (host.state / "control.json.starts").exists()  # nothing spawned
    # Group-writable by the account's group is the same hole.
    os.chown(host.manifest, 0, host.user.gid)
    host.manifest.chmod(0o664)
    res = run_as(host)
    assert res.returncode == 78
    assert f"writable by group {host.user.name}, which {host.user.name} is in" in res.stderr
    assert f"chmod g-w {host.manifest}" in res.stderr


@pytest.mark.root
def test_configuration_folder_owned_by_the_account_and_open_logs_are_refused(
        host: Host) -> None:
    chown(host.config.parent, host.user, 0o755)
    host.logs.chmod(0o755)
    res = run_as(host)
    assert res.returncode == 78
    assert "2 problem(s)" in res.stderr
    assert f"{host.config.parent}: the folder of the configuration is owned by" in res.stderr
    assert f"chmod o-rwx {host.logs}" in res.stderr
    # `check`, run by the operator as root, judges the same files from daemon.user's view.
    res = subprocess.run(cli_argv("check", "--config", str(host.config)), capture_output=True,
                         text=True, env=cli_env(), check=False, timeout=60)
    assert res.returncode == 1
    assert "[FAIL] guard rails" in res.stdout and str(host.config.parent) in res.stdout


@pytest.mark.root
def test_running_as_root_without_the_switch_is_refused(tmp_path: Path) -> None:
    require_root()
    (tmp_path / "model").mkdir()
    cfg = write_config(tmp_path / "sovereignd.yaml", {
        "server": {"model": str(tmp_path / "model")}, "logs": {"dir": str(tmp_path / "logs")}})
    res = run_cli("run", "--config", str(cfg), timeout=30)
    assert res.returncode == 78
    assert "the daemon is running as root" in res.stderr
    assert "pass --allow-root / set daemon.allow_root: true" in res.stderr
    assert not (tmp_path / "logs").exists()
