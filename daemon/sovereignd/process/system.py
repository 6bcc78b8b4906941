"""Operating-system effects on processes: find, identify, signal. The one seam tests replace.

A process is identified by (pid, start time, uid), never by name alone: a pid can be reused,
and vLLM's engine processes rename themselves (`VLLM::EngineCore`, `VLLM::Worker`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class ProcessId:
    """A process as the daemon remembers it: pid plus start time and owner."""

    pid: int
    create_time: float
    uid: int

    def as_dict(self) -> dict[str, float | int]:
        return {"pid": self.pid, "create_time": self.create_time, "uid": self.uid}


def identify(pid: int) -> ProcessId | None:
    """The identity of a live, non-zombie process, or None if it is gone."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            if p.status() == psutil.STATUS_ZOMBIE:
                return None
            return ProcessId(pid, p.create_time(), p.uids().real)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_alive(ident: ProcessId) -> bool:
    """True if the same process (same start time and owner) still runs."""
    now = identify(ident.pid)
    return now is not None and now.create_time == ident.create_time and now.uid == ident.uid


def describe(pid: int) -> str:
    """A short name for an event: the process title (vLLM renames its engine to
    `VLLM::EngineCore`), else the program's name and its first arguments."""
    try:
        p = psutil.Process(pid)
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not cmd:
        return "?"
    if len(cmd) == 1 or "::" in cmd[0]:
        return cmd[0][:80]
    return " ".join([Path(cmd[0]).name, *cmd[1:]])[:80]


def group_members(pgid: int, uid: int | None = None,
                  not_before: float | None = None) -> list[ProcessId]:
    """Live processes in process group `pgid`, optionally owned by `uid` and started no
    earlier than `not_before` (so a reused group id of an unrelated program is left alone)."""
    found = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
        except (ProcessLookupError, PermissionError):
            continue
        ident = identify(pid)
        if ident is None:
            continue
        if uid is not None and ident.uid != uid:
            continue
        if not_before is not None and ident.create_time < not_before - 1.0:
            continue
        found.append(ident)
    return found


def descendants(pid: int) -> list[ProcessId]:
    """Live descendants of `pid` (children of children included)."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []
    out = []
    for k in kids:
        ident = identify(k.pid)
        if ident is not None:
            out.append(ident)
    return out


def signal_group(pgid: int, signum: int) -> bool:
    """Send `signum` to a process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def signal_process(ident: ProcessId, signum: int) -> bool:
    """Send `signum` to one remembered process if it is still the same process."""
    if not is_alive(ident):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(ident.pid, signum)
        return True
    return False


SHM_DIR = Path("/dev/shm")  # noqa: S108 - POSIX shared memory on Linux, not a temp dir


def shared_memory(pid: int) -> set[str]:
    """Names of the POSIX shared-memory segments and named semaphores (`/dev/shm/psm_*`,
    `/dev/shm/sem.mp-*`) that process `pid` has mapped or open, read from
    `/proc/PID/maps` and `/proc/PID/fd` (Linux; empty elsewhere or if the process is gone)."""
    proc = Path("/proc") / str(pid)
    found: set[str] = set()
    prefix = f"{SHM_DIR}/"
    with contextlib.suppress(OSError), (proc / "maps").open("rb") as maps:
        for line in maps:
            at = line.find(prefix.encode())
            if at >= 0:
                found.add(_shm_name(line[at:].decode("utf-8", "replace")))
    with contextlib.suppress(OSError):
        for fd in (proc / "fd").iterdir():
            with contextlib.suppress(OSError):
                target = str(fd.readlink())
                if target.startswith(prefix):
                    found.add(_shm_name(target))
    found.discard("")
    return found


def _shm_name(path: str) -> str:
    name = path.strip()[len(str(SHM_DIR)) + 1:]
    return name.removesuffix(" (deleted)") if "/" not in name else ""


def remove_shared_memory(names: set[str], uid: int) -> list[str]:
    """Unlink those of `names` still in /dev/shm and owned by `uid`; the names removed."""
    removed = []
    for name in sorted(names):
        path = SHM_DIR / name
        try:
            st = path.lstat()
            if st.st_uid != uid:
                continue
            path.unlink()
        except OSError:
            continue
        removed.append(name)
    return removed


SIGTERM = signal.SIGTERM
SIGKILL = signal.SIGKILL
