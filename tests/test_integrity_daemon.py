"""The running daemon against its baselines: drift found in seconds, served never."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon
from tests.helpers import run_cli, wait_for
from tests.venvtools import PyEnv, pip, site_packages

pytest_plugins = ("tests.pyenvs",)

MakeDaemon = Callable[..., Daemon]
WEIGHTS = "model.bin"


def model_files(model: Path) -> None:
    (model / WEIGHTS).write_bytes(os.urandom(256 * 1024))
    (model / "tokenizer.json").write_text('{"version": "1.0"}')
    (model / "sub").mkdir(exist_ok=True)
    (model / "sub" / "extra.json").write_text("{}")


def guarded(make_daemon: MakeDaemon, overrides: dict[str, Any] | None = None,
            **kw: Any) -> Daemon:
    """A daemon whose model has an approved manifest outside the model directory."""
    d = make_daemon(overrides, **kw)
    model_files(d.model)
    baseline = d.root / "baseline"
    baseline.mkdir()
    d.cfg.setdefault("integrity", {}).update(
        {"manifest": str(baseline / "model.sha256"), "stat_interval": "500ms"})
    d.write_config()
    res = run_cli("baseline", "--config", str(d.config_path))
    assert res.returncode == 0, res.stdout + res.stderr
    return d


def quarantined_naming(d: Daemon, name: str, timeout: float = 10) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        code, body = d.get("/readyz")
        if code == 503 and body["state"] == "QUARANTINED" and name in body["reason"]:
            return dict(body)
        return None

    return wait_for(check, timeout, what=f"QUARANTINED naming {name}")


def flip_byte(path: Path) -> Callable[[], None]:
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))

    def undo() -> None:
        data[1000] ^= 0xFF
        path.write_bytes(bytes(data))

    return undo


def append(path: Path) -> Callable[[], None]:
    original = path.read_bytes()
    with path.open("ab") as f:
        f.write(b"x")
    return lambda: path.write_bytes(original)


def truncate(path: Path) -> Callable[[], None]:
    original = path.read_bytes()
    path.write_bytes(original[:100])
    return lambda: path.write_bytes(original)


def delete(path: Path) -> Callable[[], None]:
    original = path.read_bytes()
    path.unlink()
    return lambda: path.write_bytes(original)


def rename(path: Path) -> Callable[[], None]:
    moved = path.with_name(path.name + ".moved")
    path.rename(moved)
    return lambda: moved.rename(path)


def extra_file(path: Path) -> Callable[[], None]:
    injected = path.parent / "modeling_evil.py"
    injected.write_text("import os\n")
    return injected.unlink


def symlink_outside(path: Path) -> Callable[[], None]:
    original = path.read_bytes()
    outside = path.parent.parent / "outside.bin"
    outside.write_bytes(original)  # even with the same bytes: it leaves the model directory
    path.unlink()
    path.symlink_to(outside)

    def undo() -> None:
        path.unlink()
        path.write_bytes(original)

    return undo


TAMPERS = {"flip_byte": (flip_byte, WEIGHTS), "append": (append, WEIGHTS),
           "truncate": (truncate, WEIGHTS), "delete": (delete, WEIGHTS),
           "rename": (rename, WEIGHTS), "extra_file": (extra_file, "modeling_evil.py"),
           "symlink_outside": (symlink_outside, WEIGHTS)}


@pytest.mark.parametrize("kind", sorted(TAMPERS))
def test_tampering_while_ready_stops_the_server_until_the_files_verify_again(
        make_daemon: MakeDaemon, kind: str) -> None:
    tamper, named = TAMPERS[kind]
    d = guarded(make_daemon)
    d.start()
    st = d.wait_state("READY")
    assert st["integrity"]["result"] == "ok"
    pid = st["server"]["pid"]
    undo = tamper(d.model / WEIGHTS)
    body = quarantined_naming(d, named)  # /readyz says so at once; the stop follows
    st = wait_for(lambda: (s := d.status())["server"] is None and s, 10, what="server stopped")
    assert st["integrity"]["result"] == "drift"
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/status").read_text().find(
        "zombie") >= 0
    drift = d.events("integrity_drift")[-1]
    assert drift["policy"] == "stop" and any(named in f["path"] for f in drift["files"])
    assert "weights differ" in body["reason"]
    undo()
    d.wait_state("READY")
    assert d.events("integrity_restored")
    assert ("QUARANTINED", "STARTING") in d.transitions()


def test_drift_found_before_the_first_start_means_no_start(make_daemon: MakeDaemon) -> None:
    d = guarded(make_daemon)
    flip_byte(d.model / WEIGHTS)
    (d.model / "modeling_evil.py").write_text("x = 1\n")
    d.start()
    body = quarantined_naming(d, WEIGHTS)
    assert d.starts() == []
    files = d.status()["integrity"]["drift"]
    assert {f["path"] for f in files} == {WEIGHTS, "modeling_evil.py"}
    failed = next(f for f in files if f["path"] == WEIGHTS)
    assert failed["status"] == "FAILED" and failed["expected"] != failed["actual"]
    assert "2 more" not in body["reason"]


def test_an_operator_accepting_a_new_baseline_releases_the_quarantine(
        make_daemon: MakeDaemon) -> None:
    d = guarded(make_daemon)
    d.start()
    d.wait_state("READY")
    extra_file(d.model / WEIGHTS)
    quarantined_naming(d, "modeling_evil.py")
    res = run_cli("baseline", "--config", str(d.config_path), "--accept",
                  "--reason", "reviewed by J. Doe, ticket 42")
    assert res.returncode == 0, res.stdout + res.stderr
    d.wait_state("READY")
    accepted = d.events("baseline_accepted")[-1]
    assert accepted["clean"] is True and "ticket 42" in accepted["reason"]
    assert accepted["manifest_sha256"]


def test_alert_policy_keeps_serving_and_says_so(make_daemon: MakeDaemon) -> None:
    d = guarded(make_daemon, {"integrity": {"on_drift": "alert"}})
    d.start()
    d.wait_state("READY")
    flip_byte(d.model / WEIGHTS)

    def degraded() -> dict[str, Any] | None:
        code, body = d.get("/readyz")
        return body if code == 200 and "integrity" in body.get("degraded", {}) else None

    body = wait_for(degraded, 10, what="a degraded readiness")
    assert "alert only" in body["degraded"]["integrity"]
    assert d.state() == "READY" and d.events("integrity_drift")


def test_a_manifest_pin_that_does_not_match_refuses_to_start(make_daemon: MakeDaemon) -> None:
    d = guarded(make_daemon)
    d.cfg["integrity"]["manifest_sha256"] = "0" * 64
    d.write_config()
    d.start()
    quarantined_naming(d, "sha256")
    assert d.starts() == []


def test_without_a_manifest_status_says_weights_are_not_verified(
        make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    d.start()
    st = d.wait_state("READY")
    assert st["integrity"]["result"] == "disabled"


# --- the server's software environment ---------------------------------------------------------


def env_daemon(make_daemon: MakeDaemon, pyenv: PyEnv, policy: str) -> tuple[Daemon, Path]:
    d = make_daemon({"environment": {"on_drift": policy}})
    venv = pyenv.copy(d.root / "server-venv")
    d.cfg["server"]["venv"] = str(venv)
    d.cfg["environment"]["frozen"] = str(d.root / "baseline" / "server-requirements.txt")
    d.write_config()
    res = run_cli("baseline", "--config", str(d.config_path))
    assert res.returncode == 0, res.stdout + res.stderr
    return d, venv


def test_a_restored_frozen_requirements_file_releases_the_quarantine(
        make_daemon: MakeDaemon, pyenv: PyEnv) -> None:
    """Frozen requirements that no longer match their .sha256 cannot be trusted: no start. Put
    back, they are read again and the server starts without an operator."""
    d, _venv = env_daemon(make_daemon, pyenv, "stop")
    d.cfg["integrity"] = {**d.cfg.get("integrity", {}), "stat_interval": "500ms"}
    d.write_config()
    frozen = Path(d.cfg["environment"]["frozen"])
    original = frozen.read_bytes()
    frozen.write_bytes(original + b"evil==1.0\n")
    d.start()
    body = wait_for(lambda: (r := d.get("/readyz"))[1].get("state") == "QUARANTINED" and r[1],
                    30, what="QUARANTINED")
    assert "environment baseline" in body["reason"]
    assert d.starts() == []
    frozen.write_bytes(original)
    d.wait_state("READY", timeout=60)
    assert d.events("environment_baseline_readable")
    assert d.events("release")[-1]["guard"] == "environment"


def test_a_package_installed_into_the_server_venv_blocks_restarts(
        make_daemon: MakeDaemon, pyenv: PyEnv) -> None:
    """block-restart: the loaded server keeps serving; a new start is refused."""
    d, venv = env_daemon(make_daemon, pyenv, "block-restart")
    d.start()
    st = d.wait_state("READY")
    assert st["environment"]["result"] == "ok"
    pip(venv, "install", "-q", "--no-index", "--no-deps", "--find-links", str(pyenv.wheels),
        "extra-pkg")

    def degraded() -> dict[str, Any] | None:
        code, body = d.get("/readyz")
        return body if code == 200 and "environment" in body.get("degraded", {}) else None

    body = wait_for(degraded, 15, what="the environment drift")
    assert "extra-pkg" in body["degraded"]["environment"]
    assert "new starts are refused" in body["degraded"]["environment"]
    drift = d.events("environment_drift")[-1]
    assert any(f["path"] == "package extra-pkg" and f["status"] == "ADDED"
               for f in drift["files"])
    # The server dies: the daemon will not start the drifted software.
    d.set_behaviour({"default": {}})
    os_kill(d.server_pid())
    body = quarantined_naming(d, "extra-pkg")
    assert len(d.starts()) == 1


def test_an_edited_file_in_site_packages_is_named_by_the_record_check(
        make_daemon: MakeDaemon, pyenv: PyEnv) -> None:
    d, venv = env_daemon(make_daemon, pyenv, "stop")
    d.start()
    d.wait_state("READY")
    target = site_packages(venv) / "tiny_pkg" / "util.py"
    target.write_text(target.read_text() + "import os  # patched\n")
    body = quarantined_naming(d, "tiny_pkg/util.py", timeout=15)
    assert "server software differ" in body["reason"]
    drift = d.events("environment_drift")[-1]
    entry = next(f for f in drift["files"] if f["path"] == "file tiny_pkg/util.py")
    assert entry["status"] == "FAILED" and entry["dist"]


def os_kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
