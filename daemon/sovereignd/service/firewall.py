"""Per-account firewall rules from the configuration: nftables (Linux), a pf anchor (macOS).

What they do (the ports come from the configuration, the account from the install):

- nftables, table `inet sovereignd`, hook output (nft(8): `meta skuid` is the owner of the
  socket that sends the packet):
  1. where the model server listens on TCP (vllm-mlx, or `server.transport: tcp`), a connection
     to `server.port` from any account but the service account is reset at its first packet;
  2. every new loopback connection another account opens gets one bit of its conntrack mark
     (OTHER_ACCOUNT_MARK; the other bits are left as they are), and the SYN-ACK a socket of
     the service account sends back is refused when the connection was opened by another
     account — except from the gateway's port (`gateway.listen`), which is for everyone.
     This covers the ports nobody chose: vLLM's EngineCore and Worker open loopback listeners
     of their own at random ports. The SYN-ACK is a packet of the listening socket (the kernel
     attaches it to the request socket, whose full socket is the listener), so its skuid is
     the listener's owner.
     The refused SYN-ACK is answered with a reset to the listener; the connecting client hears
     nothing and its connect times out.
- pf (macOS), anchor `org.sovereignd`: the account may talk to loopback only; where the server
  listens on TCP, other accounts are refused `server.port`. The any-port rule is not rendered
  for pf (pf's `user` on inbound packets names the listener, with no way to name the
  connecting account on the same rule).

Errors: FirewallError (the account does not exist: nft could not load rules naming it).
"""

from __future__ import annotations

import pwd

from sovereignd.config import Config
from sovereignd.errors import SovereigndError

# The conntrack mark bit for "opened by another account" (nft(8) `ct mark`).
OTHER_ACCOUNT_MARK = 0x20000000


class FirewallError(SovereigndError):
    """The rules cannot be rendered (the service account is unknown)."""


def require_account(user: str) -> None:
    """Raise FirewallError unless the account exists (nft and pf resolve its name at load)."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise FirewallError(f"no account named {user!r}: create the service account first "
                            "(nft resolves the name when it loads the rules)") from None


def server_tcp_port(cfg: Config) -> int | None:
    """The server's loopback TCP port, or None when it serves on a Unix socket."""
    return cfg.server.port if cfg.server_uds is None else None


def nft_rules(cfg: Config, user: str, table: str = "sovereignd") -> str:
    """The nftables ruleset (text for `nft -f`), replacing table `inet TABLE` when loaded."""
    gateway_port = cfg.listen[1]
    port = server_tcp_port(cfg)
    lines = [
        "#!/usr/sbin/nft -f",
        "# Rendered by `sovereignd firewall render` from the configuration; do not edit.",
        f"# Service account {user}; gateway port {gateway_port}; model server "
        + (f"TCP port {port}." if port is not None else "on a Unix socket (no TCP port)."),
        "# Load: sudo nft -f FILE (replaces the table: safe to re-run)",
        f"# Check: sudo nft list table inet {table}",
        "",
        f"table inet {table}",
        f"delete table inet {table}",
        "",
        f"table inet {table} {{",
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy accept;",
    ]
    if port is not None:
        lines += [
            "\t\t# The model server's TCP port: other accounts (root too) are reset at once.",
            f'\t\toifname "lo" tcp dport {port} meta skuid != "{user}" counter '
            "reject with tcp reset",
        ]
    lines += [
        "\t\t# New loopback connections another account opens: one bit of the conntrack mark.",
        f'\t\toifname "lo" ct state new meta skuid != "{user}" '
        f"ct mark set ct mark or {OTHER_ACCOUNT_MARK:#x}",
        "\t\t# The account's other loopback listeners (vLLM's own ports) answer only the",
        "\t\t# account: a SYN-ACK to a connection another account opened is refused.",
        f'\t\toifname "lo" tcp flags & (syn | ack) == syn | ack meta skuid "{user}" '
        f"tcp sport != {gateway_port} ct mark & {OTHER_ACCOUNT_MARK:#x} != 0 counter "
        "reject with tcp reset",
        "\t}",
        "}",
        "",
    ]
    return "\n".join(lines)


def pf_anchor(cfg: Config, user: str) -> str:
    """The pf anchor's rules (text for /etc/pf.anchors/LABEL)."""
    port = server_tcp_port(cfg)
    lines = [
        "# pf anchor: rendered by `sovereignd firewall render --format pf`; do not edit.",
        f"# The service account {user} may talk to loopback only.",
        "# pf matches `user` only for TCP and UDP (it needs the socket's owner), so ICMP is not",
        "# matched. Name lookups go through mDNSResponder, another account: DNS is not blocked",
        "# here; the server runs offline. The account must exist when the anchor is loaded.",
        "",
        "# Loopback first: the gateway, the model server and the control socket live there.",
        f"pass out quick on lo0 proto {{ tcp udp }} user {user} keep state",
    ]
    if port is not None:
        lines += [
            "# The model server's TCP port (server.port) is the account's alone: other",
            "# accounts, root included, would reach its unguarded routes or take the port.",
            f"block return out quick on lo0 proto tcp from any to any port {port} "
            f"user != {user}",
        ]
    lines += [
        "# Everything else the account sends: dropped, and logged to pflog0.",
        f"block drop out log quick proto {{ tcp udp }} user {user}",
        "",
    ]
    return "\n".join(lines)
