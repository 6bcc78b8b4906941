"""Per-account firewall rules, rendered from the configuration, that keep other local accounts off
the model server's TCP port and off every other loopback listener of the service account."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sovereignd import config
from sovereignd.service import firewall
from tests.accounts import SystemUser, as_user, require_root, system_user
from tests.harness import free_port
from tests.helpers import run_cli

PROBE = ("import socket, sys\ns = socket.socket()\ns.settimeout(float(sys.argv[2]))\n"
         "try:\n    s.connect(('127.0.0.1', int(sys.argv[1])))\n"
         "except OSError as e:\n    print(type(e).__name__); sys.exit(3)\n"
         "print('connected')\n")
LISTEN = ("import socket, sys, time\ns = socket.socket()\n"
          "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('127.0.0.1', int(sys.argv[1])))\ns.listen(8)\nprint('ready', flush=True)\n"
          "sys.stdin.read()\n")


def nft() -> str:
    exe = shutil.which("nft") or ("/usr/sbin/nft" if Path("/usr/sbin/nft").exists() else None)
    if exe is None:
        pytest.fail("nft is needed to lint the rendered rules: apt-get install nftables")
    return exe


def cfg(tmp_path: Path, port: int, gateway: int, transport: str = "tcp") -> config.Config:
    text = (f"server:\n  model: {tmp_path}/model\n  port: {port}\n  transport: {transport}\n"
            f"gateway:\n  listen: 127.0.0.1:{gateway}\nlogs:\n  dir: {tmp_path}/logs\n")
    source = tmp_path / "sovereignd.yaml"
    source.write_text(text)
    return config.loads(text.encode(), source)


def rules(tmp_path: Path, c: config.Config, account: str, table: str = "sovereignd") -> Path:
    out = tmp_path / f"{table}.nft"
    out.write_text(firewall.nft_rules(c, account, table))
    return out


def code(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")
            and not ln.strip().startswith("#")]


def test_nft_rules_carry_the_configured_ports_and_parse(tmp_path: Path) -> None:
    tcp = cfg(tmp_path, 9123, 9124)
    text = firewall.nft_rules(tcp, "nobody")
    assert ('oifname "lo" tcp dport 9123 meta skuid != "nobody" counter reject with tcp reset'
            in code(text))
    assert any("tcp sport != 9124" in ln and 'meta skuid "nobody"' in ln for ln in code(text))
    assert "8001" not in text and "8000" not in text
    # The account must exist for nft to resolve it: lint with one that does.
    res = subprocess.run([nft(), "-c", "-f", str(rules(tmp_path, tcp, "nobody"))],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    broken = tmp_path / "broken.nft"
    broken.write_text(text.replace("meta skuid", "meta skuidd"))
    assert subprocess.run([nft(), "-c", "-f", str(broken)], capture_output=True,
                          check=False).returncode != 0


def test_a_server_on_a_unix_socket_gets_no_port_rule(tmp_path: Path) -> None:
    """vllm on its private Unix socket has no TCP port to guard; the any-port rule stays."""
    uds = cfg(tmp_path, 9123, 9124, transport="unix")
    text = firewall.nft_rules(uds, "nobody")
    assert "dport" not in text and "9123" not in text
    assert any("syn | ack" in ln for ln in code(text))
    assert "port 9123" not in firewall.pf_anchor(uds, "_sovereignd")


def test_pf_anchor_keeps_other_accounts_off_the_configured_port(tmp_path: Path) -> None:
    lines = code(firewall.pf_anchor(cfg(tmp_path, 9123, 9124), "_sov"))
    assert lines == ["pass out quick on lo0 proto { tcp udp } user _sov keep state",
                     "block return out quick on lo0 proto tcp from any to any port 9123 "
                     "user != _sov",
                     "block drop out log quick proto { tcp udp } user _sov"]


def test_render_command_writes_the_rules_and_refuses_an_unknown_account(tmp_path: Path) -> None:
    cfg(tmp_path, 9123, 9124)
    conf = tmp_path / "sovereignd.yaml"
    out = tmp_path / "out" / "rules.nft"
    res = run_cli("firewall", "render", "--config", str(conf), "--user", "nobody",
                  "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert "tcp dport 9123" in out.read_text()
    res = run_cli("firewall", "render", "--config", str(conf), "--format", "pf", "--user",
                  "nobody")
    assert res.returncode == 0 and "port 9123 user != nobody" in res.stdout
    name = f"nosuch{secrets.token_hex(3)}"
    res = run_cli("firewall", "render", "--config", str(conf), "--user", name)
    assert res.returncode == 1 and res.stdout == ""
    assert f"no account named '{name}'" in res.stderr


# --- root tier: the rules loaded for real, two accounts made by useradd ------------------------


@contextlib.contextmanager
def loaded(path: Path, table: str) -> Iterator[None]:
    subprocess.run([nft(), "-f", str(path)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([nft(), "delete", "table", "inet", table], check=False,
                       capture_output=True)


@contextlib.contextmanager
def listener(user: SystemUser, port: int) -> Iterator[None]:
    """A loopback listener owned by `user` (as vLLM's own ports are by the service account)."""
    with subprocess.Popen(as_user(user, [sys.executable, "-c", LISTEN, str(port)]),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            yield
        finally:
            proc.kill()


def connect(port: int, user: SystemUser | None, timeout: float = 5) -> str:
    argv = [sys.executable, "-c", PROBE, str(port), str(timeout)]
    res = subprocess.run(as_user(user, argv) if user else argv, capture_output=True, text=True,
                         check=False, timeout=60)
    return res.stdout.strip()


@pytest.mark.root
def test_nft_rules_keep_other_accounts_off_every_loopback_port_of_the_account(
        tmp_path: Path) -> None:
    """Loaded for real (own table): the server's port resets another account at once; any
    other listener of the service account never answers another account (root included);
    the gateway's port answers everyone; the service account reaches all of them."""
    require_root()
    server, gateway, own = free_port(), free_port(), free_port()
    table = f"sovtest{secrets.token_hex(3)}"
    with system_user("sovsvc") as svc, system_user() as other:
        path = rules(tmp_path, cfg(tmp_path, server, gateway), svc.name, table)
        with listener(svc, server), listener(svc, gateway), listener(svc, own), \
                loaded(path, table):
            assert connect(server, other) == "ConnectionRefusedError"
            assert connect(own, other, timeout=3) == "TimeoutError"
            assert connect(own, None, timeout=3) == "TimeoutError"  # root too
            assert connect(gateway, other) == "connected"
            for port in (server, gateway, own):
                assert connect(port, svc) == "connected", port
        # Without the rules the other account connects: the rules, not the listener, refused.
        with listener(svc, own):
            assert connect(own, other) == "connected"
