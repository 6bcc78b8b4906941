"""The model server's listener: a private Unix socket folder, and impostors on its TCP port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sovereignd.process import serversocket
from tests.accounts import as_user, require_root, shared_dir, system_user
from tests.harness import Daemon, free_port
from tests.helpers import wait_for

MakeDaemon = Callable[..., Daemon]

# A listener that answers nothing and writes every byte it receives to a file: whatever the
# daemon would send an impostor (probes, the key, client requests) ends up there.
IMPOSTOR = textwrap.dedent("""
    import socket, sys, threading, time
    port, out, patience = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, as fast as can be
    deadline = time.monotonic() + patience
    while True:  # the first free moment of the port (a killed server takes a moment to go)
        try:
            srv.bind(("127.0.0.1", port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)
    srv.listen()
    open(out + ".ready", "w").close()
    def take(conn):
        with conn, open(out, "ab") as f:
            while data := conn.recv(65536):
                f.write(data)
                f.flush()
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=take, args=(conn,), daemon=True).start()
""")


def start_impostor(port: int, out: Path, prefix: list[str] | None = None,
                   patience: float = 0.0) -> subprocess.Popen[bytes]:
    """A process of its own holding `port` (waiting up to `patience` seconds for it)."""
    proc = subprocess.Popen([*(prefix or []), sys.executable, "-c", IMPOSTOR, str(port),
                             str(out), str(patience)])
    wait_for(lambda: Path(str(out) + ".ready").exists() or proc.poll() is not None, 10 + patience,
             what="impostor listening")
    assert proc.poll() is None, "the impostor could not bind"
    return proc


@pytest.fixture
def stopper() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_socket_folder_is_made_private_and_a_stale_socket_removed(tmp_path: Path) -> None:
    path = tmp_path / "srv" / "server.sock"
    serversocket.prepare_uds(path)
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    path.parent.chmod(0o755)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    serversocket.prepare_uds(path)
    assert (path.parent.stat().st_mode & 0o777) == 0o700 and not path.exists()


def test_socket_folder_that_is_a_symlink_or_too_long_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "srv").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(serversocket.SocketDirError, match="not a folder"):
        serversocket.prepare_uds(tmp_path / "srv" / "server.sock")
    with pytest.raises(serversocket.SocketDirError, match=r"shorter daemon\.state_dir"):
        serversocket.prepare_uds(tmp_path / ("x" * 120) / "server.sock")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path (pytest's tmp_path is too long for vLLM's IPC names)."""
    path = Path(tempfile.mkdtemp(prefix="sovt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_private_tmp_is_made_private_and_emptied_before_each_start(
        tmp_path: Path, short_dir: Path) -> None:
    """vLLM's ZMQ IPC sockets and rendezvous files a previous server left go; a link inside
    is removed, never followed; a folder too long for the IPC socket names is refused."""
    tmp = short_dir / "srv" / "tmp"
    serversocket.prepare_private_tmp(tmp)
    assert (tmp.stat().st_mode & 0o777) == (tmp.parent.stat().st_mode & 0o777) == 0o700
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "precious").write_text("x")
    (tmp / "vllm_dist_0123").write_text("")
    (tmp / "sub").mkdir()
    (tmp / "link").symlink_to(outside)
    with socket.socket(socket.AF_UNIX) as ipc:
        ipc.bind(str(tmp / "8ff13e6c-eee8-4c44-bf15-1678d452c099"))
    tmp.chmod(0o755)
    serversocket.prepare_private_tmp(tmp)
    assert list(tmp.iterdir()) == [] and (tmp.stat().st_mode & 0o777) == 0o700
    assert (outside / "precious").read_text() == "x"
    with pytest.raises(serversocket.SocketDirError, match=r"shorter daemon\.state_dir"):
        serversocket.prepare_private_tmp(tmp_path / ("x" * 70) / "tmp")


def test_listener_is_owned_only_by_the_process_holding_it(
        tmp_path: Path, stopper: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    assert serversocket.check_listener("127.0.0.1", port, [os.getpid()]).impostor is None
    with socket.socket() as mine:
        mine.bind(("127.0.0.1", port))
        mine.listen()
        assert serversocket.check_listener("127.0.0.1", port, [os.getpid()]).owned
    other = free_port()
    proc = start_impostor(other, tmp_path / "got")
    stopper.append(proc)
    check = serversocket.check_listener("127.0.0.1", other, [os.getpid()])
    assert not check.owned and check.impostor == {"uid": os.getuid(), "pid": proc.pid,
                                                  "name": Path(sys.executable).name}
    assert f"pid {proc.pid}" in check.detail


def test_server_binding_its_port_during_the_check_is_not_an_impostor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server binds its port between the look at its processes and the look at the port
    (a starting server does): it is the server, not a foreign holder."""
    port = free_port()
    with socket.socket() as mine:
        real_listens = serversocket._listens
        looks: list[int] = []

        def listens_after_first_look(pid: int, host: str, p: int) -> bool:
            looks.append(pid)
            if len(looks) == 1:  # the first look: not bound yet; bind now, as the server does
                mine.bind(("127.0.0.1", port))
                mine.listen()
                return False
            return real_listens(pid, host, p)

        monkeypatch.setattr(serversocket, "_listens", listens_after_first_look)
        check = serversocket.check_listener("127.0.0.1", port, [os.getpid()])
        assert check.owned and check.impostor is None, check.detail


def test_impostor_on_the_port_during_start_is_never_talked_to(
        make_daemon: MakeDaemon, tmp_path: Path,
        stopper: list[subprocess.Popen[bytes]]) -> None:
    """An impostor that binds the port while the server loads gets no probe, no key, no
    request; the daemon retries with backoff (never FATAL) and serves once the port is free."""
    d = make_daemon({"restart": {"max_failures": 100, "backoff_max": "1s"}},
                    behaviour={"starts": [{"startup_delay": 3}], "default": {}})
    d.start()
    wait_for(lambda: d.events("spawn"), 20, what="first spawn")
    got = tmp_path / "impostor.bytes"
    proc = start_impostor(d.server_port, got)
    stopper.append(proc)
    wait_for(lambda: len(d.events("port_impostor")) >= 2, 20, what="impostor refused twice")
    event = d.events("port_impostor")[0]
    assert event["holder"]["pid"] == proc.pid and event["level"] == "critical"
    code, _ = d.get("/v1/models")
    assert code in (401, 503)
    proc.kill()
    proc.wait()
    d.wait_state("READY", timeout=30)
    assert not got.exists() or got.read_bytes() == b""
    assert "FATAL" not in {to for _, to in d.transitions()}


def test_default_vllm_transport_is_a_unix_socket_with_no_tcp_listener(
        make_daemon: MakeDaemon) -> None:
    d = make_daemon({"server": {"transport": "auto"}})
    d.start()
    d.wait_state("READY")
    sock = d.logs / "srv" / "server.sock"
    argv = d.starts()[0]["argv"]
    assert argv[argv.index("--uds") + 1] == str(sock) and "--port" not in argv
    assert (sock.parent.stat().st_mode & 0o777) == 0o700
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", d.server_port)) != 0  # nothing on TCP


@pytest.mark.root
def test_other_account_cannot_reach_the_socket_nor_fool_the_daemon_on_tcp(
        make_daemon: MakeDaemon, tmp_path: Path,
        stopper: list[subprocess.Popen[bytes]]) -> None:
    """A second local account (useradd) cannot connect to the server's Unix socket; on TCP,
    the port it binds first is refused with its uid named, and never sent a byte."""
    require_root()
    with system_user() as user, shared_dir() as base:
        base.chmod(0o755)
        d = make_daemon({"server": {"transport": "auto"},
                         "daemon": {"state_dir": str(base / "state")}})
        d.start()
        d.wait_state("READY")
        sock = base / "state" / "srv" / "server.sock"
        (base / "state").chmod(0o755)  # only the socket's own folder (0700) is in the way
        probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
                 "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
                 "    print(e.errno); sys.exit(3)\nprint('connected')\n")
        res = subprocess.run(as_user(user, [sys.executable, "-c", probe, str(sock)]),
                             capture_output=True, text=True, check=False, timeout=30)
        assert res.returncode == 3 and res.stdout.strip() == "13", res.stdout + res.stderr
        d.close()

        t = make_daemon({"restart": {"max_failures": 100, "backoff_max": "1s"}}, name="t")
        got = base / "impostor.bytes"
        base.chmod(0o777)
        proc = start_impostor(t.server_port, got, as_user(user, []))
        stopper.append(proc)
        t.start()
        wait_for(lambda: t.events("port_impostor"), 20, what="impostor refused")
        assert t.events("port_impostor")[0]["holder"]["uid"] == user.uid
        assert t.starts() == []
        proc.kill()
        proc.wait()
        t.wait_state("READY", timeout=30)
        assert not got.exists() or got.read_bytes() == b""
