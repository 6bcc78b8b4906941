"""Where the model server listens, and proof that the daemon talks only to the server it started.

Two ways, chosen by `server.transport`:

- a Unix socket in a folder only the service account can enter (mode 0700): no other local
  account can connect to the server, nor put its own socket in the server's place;
- a loopback TCP port (vllm-mlx has no Unix socket). Any local account can bind a free port,
  so before each connection the daemon confirms that the port's listening socket is held by
  one of the server's own processes (the socket in the process's descriptors, read through
  psutil: /proc/PID/fd on Linux, proc_pidinfo on macOS). An impostor is never talked to; it is
  named by pid and uid where the system shows them (on Linux the uid always: /proc/net/tcp).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from sovereignd.errors import SovereigndError

# sockaddr_un.sun_path holds 108 bytes on Linux and 104 on macOS, the terminating NUL included.
MAX_UDS_PATH = 103
# Wildcard addresses as psutil reports them: a listener there also holds the loopback port.
_WILDCARD = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - compared against, never bound


class SocketDirError(SovereigndError):
    """The server's socket folder cannot be made private to the service account."""


def prepare_uds(path: Path) -> None:
    """Make `path`'s folder private (created 0700, or checked: owned by this account, no access
    for group or others, not a symlink) and remove a stale socket at `path`, which vLLM's bind
    would refuse. Raises SocketDirError with the fix."""
    if len(os.fsencode(path)) > MAX_UDS_PATH:
        raise SocketDirError(
            f"the server's socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets "
            f"allow {MAX_UDS_PATH} — set a shorter daemon.state_dir or server.uds")
    _private_folder(path.parent)
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SocketDirError(f"cannot remove the old server socket {path}: "
                             f"{exc.strerror or exc}") from exc


# vLLM names its ZMQ IPC sockets `<VLLM_RPC_BASE_PATH>/<uuid4>` (vllm/utils/network_utils.py
# get_open_zmq_ipc_path, vllm 0.32): 36 characters after the folder and a slash.
_IPC_NAME = 37


def ipc_fits(folder: Path) -> bool:
    """Whether vLLM's IPC socket names under `folder` fit a Unix socket address."""
    return len(os.fsencode(folder)) + _IPC_NAME <= MAX_UDS_PATH


def prepare_private_tmp(folder: Path) -> None:
    """Make the server's own temporary folder (its TMPDIR and VLLM_RPC_BASE_PATH) private, as
    prepare_uds does the socket folder, and empty it: what a previous server left (ZMQ IPC
    sockets, `vllm_dist_*` rendezvous files) goes. Raises SocketDirError with the fix."""
    if not ipc_fits(folder):
        raise SocketDirError(
            f"the server's temporary folder {folder} is too long for the Unix sockets vLLM "
            f"makes in it ({MAX_UDS_PATH - _IPC_NAME} bytes at most) — set a shorter "
            "daemon.state_dir")
    _private_folder(folder.parent)
    _private_folder(folder)
    try:
        _empty(folder)
    except OSError as exc:
        raise SocketDirError(f"cannot empty the server's temporary folder {folder}: "
                             f"{exc.strerror or exc}") from exc


def _empty(folder: Path) -> int:
    """Remove everything in `folder` (folders whole; a symlink itself, never its target);
    how many entries went. OSError from the first that cannot be removed."""
    removed = 0
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed += 1
    return removed


def remove_leftovers(uds: Path | None, tmp: Path | None) -> int:
    """After the server's last process is gone: remove its socket at `uds` and what it left in
    its temporary folder `tmp` (ZMQ IPC sockets, rendezvous files), so a stopped service leaves
    no stale sockets behind (vLLM does not always remove them on SIGTERM). Best effort: returns
    how many entries went; what cannot be removed is removed before the next start."""
    removed = 0
    with contextlib.suppress(OSError):
        if uds is not None and stat.S_ISSOCK(uds.lstat().st_mode):
            uds.unlink()
            removed += 1
    if tmp is not None and tmp.is_dir() and not tmp.is_symlink():
        with contextlib.suppress(OSError):
            removed += _empty(tmp)
    return removed


def _private_folder(folder: Path) -> None:
    """Create `folder` 0700, or check it: owned by this account, a folder (not a symlink),
    no access for group or others (fixed if it can be). Raises SocketDirError."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = folder.lstat()
    except OSError as exc:
        raise SocketDirError(f"cannot create the server's socket folder {folder}: "
                             f"{exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SocketDirError(f"the server's socket folder {folder} is not a folder (a symlink "
                             "or file is in its place); remove it")
    if st.st_uid != os.geteuid():
        raise SocketDirError(
            f"the server's socket folder {folder} belongs to uid {st.st_uid}, not to the "
            f"service account (uid {os.geteuid()}): another account could replace the server's "
            f"socket — remove it or `chown {os.geteuid()} {folder}`")
    if st.st_mode & 0o077:
        try:
            folder.chmod(0o700)
        except OSError as exc:
            raise SocketDirError(f"the server's socket folder {folder} is mode "
                                 f"{stat.S_IMODE(st.st_mode):o} and cannot be made 0700: "
                                 f"{exc.strerror or exc}") from exc


@dataclass(frozen=True)
class ListenerCheck:
    """Who holds the server's TCP port: `owned` by the server, nobody yet, or an impostor."""

    owned: bool
    detail: str
    impostor: dict[str, Any] | None = field(default=None)


def check_listener(host: str, port: int, pids: Iterable[int]) -> ListenerCheck:
    """Whether the socket listening on host:port belongs to one of `pids` (the server's
    processes). Blocking (reads /proc); run it in a thread."""
    pids = list(pids)
    for pid in pids:
        if _listens(pid, host, port):
            return ListenerCheck(True, f"pid {pid} listens on {host}:{port}")
    if port_free(host, port):
        return ListenerCheck(False, f"nothing listens on {host}:{port} yet")
    # The server may have bound the port between the look above and port_free (a starting
    # server does exactly that): look at its processes once more before calling it foreign.
    for pid in pids:
        if _listens(pid, host, port):
            return ListenerCheck(True, f"pid {pid} listens on {host}:{port}")
    holder = holder_of(port)
    who = ", ".join(f"{k} {v}" for k, v in holder.items()) or "an account this daemon cannot see"
    return ListenerCheck(False, f"{host}:{port} is held by a process that is not the server "
                                f"({who}); it was not contacted", holder)


def _listens(pid: int, host: str, port: int) -> bool:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
               and (c.laddr.ip == host or c.laddr.ip in _WILDCARD) for c in conns)


def port_free(host: str, port: int) -> bool:
    """True if nothing listens on host:port (SO_REUSEADDR ignores TIME_WAIT leftovers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def holder_of(port: int) -> dict[str, Any]:
    """What can be learnt about whoever listens on `port`: uid (Linux: /proc/net/tcp, readable
    by every account), pid and name (only where this account may see the process)."""
    found: dict[str, Any] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            # sl local_address rem_address st ... uid timeout inode (proc(5))
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                found["uid"] = int(cols[7])
                break
        if found:
            break
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        conns = []
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            found["pid"] = c.pid
            try:
                proc = psutil.Process(c.pid)
                found["name"] = proc.name()
                found.setdefault("uid", proc.uids().real)
            except psutil.Error:
                pass
            break
    return found
