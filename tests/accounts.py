"""Real system accounts for the root tier: create one, run the daemon as it, remove it.

Tests that use these are marked `root` and fail (never skip) when not run as root: CI runs
as root, and a skipped guard-rail test would hide exactly what it is there to catch.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.helpers import DAEMON_SRC, REPO


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test creates accounts and changes owners: run it as root (CI does; "
                    "locally: sudo /path/to/venv/bin/python -m pytest -m root)")


@dataclass(frozen=True)
class SystemUser:
    """A system account made for one test."""

    name: str
    uid: int
    gid: int


@contextlib.contextmanager
def system_user(prefix: str = "sovtest") -> Iterator[SystemUser]:
    """`useradd --system` a uniquely named account; kill its processes and `userdel` it after."""
    name = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", "--user-group", name], check=True,
                   capture_output=True)
    entry = pwd.getpwnam(name)
    try:
        yield SystemUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        remove_user(name)


def remove_user(name: str) -> None:
    """Kill whatever the account still runs, then delete it and its group."""
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    for p in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error):
            if p.info["uids"] and p.info["uids"].real == uid:
                p.kill()
    subprocess.run(["userdel", name], check=False, capture_output=True)
    with contextlib.suppress(KeyError):
        grp.getgrnam(name)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A folder another account can reach (pytest's tmp_path is 0700 under /tmp/pytest-of-root),
    owned by root, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="sovtest-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(user: SystemUser, argv: list[str]) -> list[str]:
    """`argv` run as `user` (uid, gid and its groups), with the environment kept as given."""
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--",
            *argv]


def install_sources(dest: Path) -> Path:
    """Copy the daemon package and the stand-in server where any account can read them."""
    src = dest / "src"
    shutil.copytree(DAEMON_SRC / "sovereignd", src / "sovereignd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "tests" / "fakes" / "fake_vllm.py", src / "fake_vllm.py")
    for p in [src, *src.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return src


def python_for(user: SystemUser, pythonpath: str) -> str:
    """An interpreter `user` can execute that runs the test venv's packages: the venv's own
    Python often lies under /root (0700), so a system Python of the same version is tried."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, str(Path(sys.executable).resolve()),
                  getattr(sys, "_base_executable", ""), f"/usr/bin/python{version}",
                  f"/usr/local/bin/python{version}"]
    env = {**os.environ, "PYTHONPATH": pythonpath}
    # Judged by mode bits first: where /root is 0700, trying to run it is not a reliable test
    # (a sandbox may let one exec through and refuse the daemon's own spawn).
    candidates = [c for c in candidates if c and reachable_by_others(Path(c))]
    probe = "import sys, aiohttp, orjson, psutil, structlog, yaml; print(sys.version_info[:2])"
    tried = []
    for cand in dict.fromkeys(c for c in candidates if c):
        res = subprocess.run(as_user(user, [cand, "-c", probe]), capture_output=True, text=True,
                             env=env, check=False, timeout=60)
        want = f"({sys.version_info.major}, {sys.version_info.minor})"
        if res.returncode == 0 and res.stdout.strip() == want:
            return cand
        tried.append(f"{cand}: {(res.stderr or res.stdout).strip()[-200:]}")
    pytest.fail(f"no Python {version} that {user.name} can run with the test venv's packages "
                f"(site-packages must be readable by other accounts): {tried}")


def reachable_by_others(path: Path) -> bool:
    """Whether an account with no special group can reach and run `path` (mode bits)."""
    real = path.resolve()
    try:
        if not real.stat().st_mode & 0o001:
            return False
        return all(d.stat().st_mode & 0o001 for d in real.parents)
    except OSError:
        return False


def user_env(src: Path) -> dict[str, str]:
    """Environment for the daemon run as another account: its sources and the venv's packages."""
    purelib = sysconfig.get_paths()["purelib"]
    platlib = sysconfig.get_paths()["platlib"]
    path = os.pathsep.join(dict.fromkeys([str(src), purelib, platlib]))
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": path, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1"}
