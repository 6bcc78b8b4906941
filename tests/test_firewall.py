"""Per-account firewall rules that keep other local accounts off the model server's TCP port."""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.accounts import as_user, require_root, system_user
from tests.harness import free_port
from tests.helpers import REPO

NFT_RULES = REPO / "ops" / "linux" / "sovereignd.nft"
PF_ANCHOR = REPO / "ops" / "macos" / "pf.anchors" / "org.sovereignd"


def nft() -> str:
    exe = shutil.which("nft") or ("/usr/sbin/nft" if Path("/usr/sbin/nft").exists() else None)
    if exe is None:
        pytest.fail("nft is needed to lint ops/linux/sovereignd.nft: apt-get install nftables")
    return exe


def rendered(tmp_path: Path, account: str, port: int, table: str = "sovereignd") -> Path:
    text = NFT_RULES.read_text()
    text = text.replace('"sovereignd"', f'"{account}"').replace("dport 8001", f"dport {port}")
    text = text.replace("inet sovereignd", f"inet {table}")
    out = tmp_path / "rules.nft"
    out.write_text(text)
    return out


def test_nft_rules_parse_and_name_the_account_and_the_config_port(tmp_path: Path) -> None:
    text = NFT_RULES.read_text()
    rule = next(ln.strip() for ln in text.splitlines() if "skuid" in ln and "#" not in ln)
    assert rule == ('oifname "lo" tcp dport 8001 meta skuid != "sovereignd" counter reject '
                    "with tcp reset")
    template = (REPO / "ops" / "linux" / "sovereignd.yaml.in").read_text()
    assert re.search(r"^\s+port: 8001$", template, re.M)
    # The account must exist for nft to resolve it: lint with one that does.
    res = subprocess.run([nft(), "-c", "-f", str(rendered(tmp_path, "nobody", 8001))],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    broken = tmp_path / "broken.nft"
    broken.write_text(text.replace("meta skuid", "meta skuidd"))
    assert subprocess.run([nft(), "-c", "-f", str(broken)], capture_output=True,
                          check=False).returncode != 0


def test_pf_anchor_keeps_other_accounts_off_the_server_port_after_the_loopback_pass() -> None:
    rules = [ln for ln in PF_ANCHOR.read_text().splitlines() if ln and not ln.startswith("#")]
    guard = [i for i, r in enumerate(rules) if "port 8001" in r]
    assert len(guard) == 1
    assert rules[guard[0]].startswith("block return out quick on lo0 proto tcp")
    assert rules[guard[0]].endswith("user != _sovereignd")
    assert rules[0].startswith("pass out quick on lo0") and guard[0] > 0


@pytest.mark.root
def test_nft_rules_refuse_another_account_and_pass_the_service_account(tmp_path: Path) -> None:
    """Loaded for real (own table, a free port): a second account made by useradd is reset,
    the service account (here root, which runs the test daemon) connects."""
    require_root()
    port = free_port()
    table = f"sovtest{secrets.token_hex(3)}"
    rules = rendered(tmp_path, "root", port, table)
    with socket.socket() as srv, system_user() as user:
        srv.bind(("127.0.0.1", port))
        srv.listen()
        subprocess.run([nft(), "-f", str(rules)], check=True, capture_output=True)
        try:
            probe = ("import socket, sys\ns = socket.socket()\ns.settimeout(5)\n"
                     "try:\n    s.connect(('127.0.0.1', int(sys.argv[1])))\n"
                     "except OSError as e:\n    print(type(e).__name__); sys.exit(3)\n"
                     "print('connected')\n")
            other = subprocess.run(as_user(user, [sys.executable, "-c", probe, str(port)]),
                                   capture_output=True, text=True, check=False, timeout=30)
            assert other.returncode == 3, other.stdout + other.stderr
            assert "ConnectionRefusedError" in other.stdout
            own = subprocess.run([sys.executable, "-c", probe, str(port)],
                                 capture_output=True, text=True, check=False, timeout=30)
            assert own.returncode == 0 and own.stdout.strip() == "connected"
        finally:
            subprocess.run([nft(), "delete", "table", "inet", table], check=False,
                           capture_output=True)
