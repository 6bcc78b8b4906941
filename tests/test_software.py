"""Every file that can run is approved: the venv file by file, its bytecode, its interpreter,
and the daemon's own venv; real venvs, real interpreters, real daemons."""

from __future__ import annotations

import marshal
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sovereignd.errors import ManifestError
from sovereignd.integrity import software
from sovereignd.integrity.record import verify_records
from tests.harness import Daemon
from tests.helpers import DAEMON_SRC, cli_env, run_cli, wait_for
from tests.venvtools import PyEnv, make_wheel, pip, site_packages

pytest_plugins = ("tests.pyenvs",)

MakeDaemon = Callable[..., Daemon]
SIX = "''' six: a module that real venvs hold (as the report's case). '''\nPY3 = True\n"
MARKER = "PAYLOAD-RAN"


def six_venv(pyenv: PyEnv, dest: Path) -> Path:
    """A copy of the base venv with `six` installed by pip (which byte-compiles it)."""
    venv = pyenv.copy(dest)
    wheels = dest.parent / f"{dest.name}-wheels"
    wheels.mkdir()
    make_wheel(wheels, "six", "1.16.0", {"six.py": SIX})
    pip(venv, "install", "-q", "--no-index", "--no-deps", "--find-links", str(wheels), "six")
    return venv


def six_pyc(venv: Path) -> Path:
    return site_packages(venv) / "__pycache__" / f"six.{sys.implementation.cache_tag}.pyc"


def plant_payload(venv: Path) -> Path:
    """Rewrite six's bytecode with code that prints a marker, keeping its 16-byte header."""
    pyc = six_pyc(venv)
    header = pyc.read_bytes()[:16]
    code = compile(f"print({MARKER!r})\nPY3 = True\n", str(site_packages(venv) / "six.py"),
                   "exec")
    pyc.write_bytes(header + marshal.dumps(code))
    return pyc


def run_in(venv: Path, code: str) -> str:
    """Run code in the venv as a server would: writing bytecode where it may."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                          text=True, check=True, timeout=60, env=env).stdout


def test_a_pyc_payload_under_its_original_header_is_drift_named_with_the_file(
        pyenv: PyEnv, tmp_path: Path) -> None:
    """The report's case: Python runs the payload, RECORD sees nothing, the manifest does."""
    venv = six_venv(pyenv, tmp_path / "venv")
    approved = software.create(venv)
    pyc = plant_payload(venv)
    assert MARKER in run_in(venv, "import six")
    assert verify_records(venv).ok  # pip writes no hash for .pyc: RECORD is blind
    report = software.verify(approved)
    assert [(i.path, i.status) for i in report.issues] == [(str(pyc), "CHANGED")]
    assert "its code is not what its source compiles to" in report.issues[0].detail
    assert str(pyc) in report.render()


def test_bytecode_python_rewrites_from_the_verified_source_is_not_drift(
        pyenv: PyEnv, tmp_path: Path) -> None:
    """A newer source mtime makes Python rewrite the .pyc (new header, same code)."""
    venv = six_venv(pyenv, tmp_path / "venv")
    approved = software.create(venv)
    source, pyc = site_packages(venv) / "six.py", six_pyc(venv)
    before = pyc.read_bytes()
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    approved_source = approved.digests[str(source)]
    run_in(venv, "import six")
    assert pyc.read_bytes() != before  # rewritten by the interpreter itself
    report = software.verify(approved)
    assert report.ok, report.render()
    assert str(pyc) in report.recompiled
    assert approved.digests[str(source)] == approved_source


def test_changed_source_and_its_rewritten_bytecode_are_both_drift(
        pyenv: PyEnv, tmp_path: Path) -> None:
    venv = six_venv(pyenv, tmp_path / "venv")
    approved = software.create(venv)
    source = site_packages(venv) / "six.py"
    source.write_text(SIX + "import os  # patched\n")
    run_in(venv, "import six")
    found = {i.path: i for i in software.verify(approved).issues}
    assert found[str(source)].status == "CHANGED"
    assert "source that does not verify" in found[str(six_pyc(venv))].detail


def test_files_no_record_lists_scripts_and_removed_files_are_reported(
        pyenv: PyEnv, tmp_path: Path) -> None:
    venv = six_venv(pyenv, tmp_path / "venv")
    approved = software.create(venv)
    (venv / "bin" / "helper").write_text("#!/bin/sh\necho hi\n")
    (site_packages(venv) / "zz.pth").write_text("import os\n")
    (site_packages(venv) / "six.py").unlink()
    (venv / "pyvenv.cfg").write_text((venv / "pyvenv.cfg").read_text() + "x = 1\n")
    found = {i.path: i.status for i in software.verify(approved).issues}
    assert found[str(venv / "bin" / "helper")] == "EXTRA"
    assert found[str(site_packages(venv) / "zz.pth")] == "EXTRA"
    assert found[str(site_packages(venv) / "six.py")] == "MISSING"
    assert found[str(venv / "pyvenv.cfg")] == "CHANGED"
    # The touched paths alone give the same verdicts (the watcher's re-check).
    limited = software.verify(approved, paths=[venv / "bin"])
    assert [i.path for i in limited.issues] == [str(venv / "bin" / "helper")]
    # A folder link (lib64 -> lib) is approved by its target, also when touched itself.
    assert (venv / "lib64").is_symlink()
    assert software.verify(approved, paths=[venv / "lib64"]).ok
    (venv / "lib64").unlink()
    (venv / "lib64").symlink_to("/tmp")
    assert [(i.path, i.status) for i in software.verify(approved, paths=[venv / "lib64"]).issues
            ] == [(str(venv / "lib64"), "CHANGED")]


def test_the_manifest_reads_back_and_rejects_a_changed_copy(pyenv: PyEnv,
                                                            tmp_path: Path) -> None:
    venv = six_venv(pyenv, tmp_path / "venv")
    path = tmp_path / "software.sha256"
    digest = software.write(path, software.create(venv))
    back = software.read(path, digest)
    assert back.interpreter.version == sys.version.split()[0]
    assert str(site_packages(venv) / "six.py") in back.digests
    path.write_bytes(path.read_bytes() + b"0" * 64 + b"  /etc/hostname\n")
    with pytest.raises(ManifestError, match="changed after approval"):
        software.read(path, digest)
    with pytest.raises(ManifestError, match="not a software manifest"):
        software.parse(b"0" * 64 + b"  /x\n", "x")


# --- a test interpreter ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private copy of the interpreter the tests run on (binary and standard library,
    without its test suite and its own site-packages), so its stdlib can be edited."""
    base = Path(sys.base_prefix)
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    root = tmp_path_factory.mktemp("python")
    (root / "bin").mkdir()
    shutil.copy2(Path(sys._base_executable).resolve(), root / "bin" / minor)  # type: ignore[attr-defined]
    shutil.copytree(base / "lib" / minor, root / "lib" / minor, symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "dist-packages", "test",
                                                  "idlelib", "tkinter", "lib2to3"))
    yield root / "bin" / minor
    shutil.rmtree(root, ignore_errors=True)


def test_an_edited_stdlib_module_of_the_interpreter_is_drift(test_python: Path,
                                                             tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([str(test_python), "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    approved = software.create(venv)
    stdlib = test_python.parent.parent / "lib" / test_python.name
    assert approved.interpreter.executable == str(test_python)
    assert approved.interpreter.stdlib == (str(stdlib),)
    assert approved.interpreter.build == run_in(venv, "import sys; print(sys.version)").strip()
    assert str(stdlib / "json" / "__init__.py") in approved.digests
    assert software.verify(approved).ok
    target = stdlib / "json" / "__init__.py"
    target.write_text(target.read_text() + "\nimport os  # patched\n")
    found = {i.path: i.status for i in software.verify(approved).issues}
    assert found == {str(target): "CHANGED"}
    ok, text = software.interpreter_check(approved, venv)
    assert ok and approved.interpreter.version in text


# --- the daemon with a server venv ----------------------------------------------------------


def six_daemon(make_daemon: MakeDaemon, pyenv: PyEnv, policy: str) -> tuple[Daemon, Path]:
    d = make_daemon({"environment": {"on_drift": policy}})
    venv = six_venv(pyenv, d.root / "server-venv")
    d.cfg["server"]["venv"] = str(venv)
    d.cfg["environment"]["frozen"] = str(d.root / "baseline" / "server-requirements.txt")
    d.write_config()
    res = run_cli("baseline", "--config", str(d.config_path))
    assert res.returncode == 0, res.stdout + res.stderr
    return d, venv


def readyz_naming(d: Daemon, state: str, name: str, timeout: float = 20) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        code, body = d.get("/readyz")
        if code == 503 and body["state"] == state and name in body["reason"]:
            return dict(body)
        return None

    return wait_for(check, timeout, what=f"{state} naming {name}")


def test_the_daemon_refuses_to_start_a_server_on_a_planted_pyc(
        make_daemon: MakeDaemon, pyenv: PyEnv) -> None:
    d, venv = six_daemon(make_daemon, pyenv, "block-restart")
    pyc = plant_payload(venv)
    d.start()
    body = readyz_naming(d, "QUARANTINED", pyc.name)
    assert "server software differ" in body["reason"]
    assert d.starts() == []
    drift = d.events("environment_drift")[-1]
    assert {"path": f"file {pyc}", "status": "CHANGED"}.items() <= drift["files"][0].items()
    check = run_cli("env", "verify", "--config", str(d.config_path))
    assert check.returncode == 1 and str(pyc) in check.stdout


def test_check_shows_the_approved_interpreter(
        make_daemon: MakeDaemon, pyenv: PyEnv) -> None:
    d, _ = six_daemon(make_daemon, pyenv, "stop")
    out = run_cli("check", "--config", str(d.config_path)).stdout
    line = next(ln for ln in out.splitlines() if "server interpreter" in ln)
    assert f"CPython {sys.version.split()[0]}" in line and "binary as approved" in line
    assert "daemon.software_manifest is not set" in out


def test_a_pyc_planted_while_serving_quarantines_under_stop(
        make_daemon: MakeDaemon, pyenv: PyEnv) -> None:
    d, venv = six_daemon(make_daemon, pyenv, "stop")
    d.start()
    st = d.wait_state("READY")
    assert st["environment"]["python"].startswith(f"CPython {sys.version.split()[0]}")
    assert st["environment"]["software_files"] > 1000  # the venv and the standard library
    pyc = plant_payload(venv)
    readyz_naming(d, "QUARANTINED", pyc.name)
    assert any(f["path"] == f"file {pyc}" for f in d.events("environment_drift")[-1]["files"])


def test_a_pyc_planted_while_serving_blocks_restarts_under_block_restart(
        make_daemon: MakeDaemon, pyenv: PyEnv) -> None:
    d, venv = six_daemon(make_daemon, pyenv, "block-restart")
    d.start()
    d.wait_state("READY")
    pyc = plant_payload(venv)

    def degraded() -> str | None:
        code, body = d.get("/readyz")
        reason = body.get("degraded", {}).get("environment") if code == 200 else None
        return reason if reason and pyc.name in reason else None

    assert "new starts are refused" in wait_for(degraded, 20, what="environment drift")


# --- the daemon's own software --------------------------------------------------------------


@pytest.fixture
def daemon_venv(tmp_path: Path) -> Path:
    """A venv made for the test that runs this checkout of the daemon (its packages through a
    .pth on the test venv's site-packages), so the test can tamper with it."""
    venv = tmp_path / "daemon-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    here = next(p for p in sys.path if p.endswith("site-packages"))
    (site_packages(venv) / "deps.pth").write_text(f"{DAEMON_SRC}\n{here}\n")
    return venv


def test_the_daemons_own_venv_tampered_is_reported(make_daemon: MakeDaemon,
                                                   daemon_venv: Path) -> None:
    d = make_daemon({"daemon": {"software_manifest": "PLACEHOLDER"}})
    own = d.root / "baseline" / "daemon-software.sha256"
    d.cfg["daemon"]["software_manifest"] = str(own)
    d.write_config()
    python = str(daemon_venv / "bin" / "python")
    argv = [python, "-m", "sovereignd"]
    res = subprocess.run([*argv, "baseline", "--config", str(d.config_path)],
                         capture_output=True, text=True, env=cli_env(), timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the daemon itself" in res.stdout
    ok = subprocess.run([*argv, "env", "verify", "--self", "--config", str(d.config_path)],
                        capture_output=True, text=True, env=cli_env(), timeout=120, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    evil = site_packages(daemon_venv) / "zz-evil.pth"
    evil.write_text("import os\n")
    bad = subprocess.run([*argv, "env", "verify", "--self", "--config", str(d.config_path)],
                         capture_output=True, text=True, env=cli_env(), timeout=120,
                         check=False)
    assert bad.returncode == 1 and f"EXTRA {evil}" in bad.stdout
    with d.stdout.open("ab") as out, d.stderr.open("ab") as err:
        d.proc = subprocess.Popen([*argv, "run", "--config", str(d.config_path)], stdout=out,
                                  stderr=err, env=cli_env(), start_new_session=True)
    st = d.wait_state("READY")  # alert only: still serving
    assert st["self"]["result"] == "drift"
    assert st["self"]["drift"][0]["path"] == f"file {evil}"
    assert st["self"]["python"].startswith("CPython")
    event = d.events("self_drift")[-1]
    assert event["files"][0]["path"] == f"file {evil}"
    assert "self" in st["degraded"]
