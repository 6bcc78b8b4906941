"""`sovereignd fleet haproxy`: an HAProxy configuration for several sovereignd hosts.

What it sets, and why (HAProxy 2.6 configuration manual, doc/configuration.txt):
- `option httpchk` + `http-check send meth GET uri /readyz`, `http-check expect status 200`:
  a host leaves the rotation when /readyz is 503 (not READY, stalled, quarantined, drained).
  `inter`/`fastinter` x `fall` bounds how long a host that stopped being ready still gets
  new requests; `rise` how many passing checks bring it back.
- `retry-on conn-failure empty-response 503` with `option redispatch 1` (another host on every
  retry): retried are requests no host answered: a refused or failed connection, a kept-alive
  connection the host closed before reading the request (the gateway closes idle connections
  after gateway.idle_timeout) or a host that died before answering (`empty-response`: its
  generation may have begun, and runs again on another host, which costs time, not correctness,
  except for a stored Responses API answer), and sovereignd's 503 answers, which it gives only
  before a request reaches the model server (not ready, draining, records unavailable). The
  model server's own statuses pass through unchanged, so a model server answering 503 itself
  would be retried too (not seen from vLLM or vllm-mlx here). A 502/504 (the model server failed
  mid-request) is never retried: the generation may have run. HAProxy retries only requests that
  fit its buffer (tune.bufsize, 16 KiB by default).
- `no option http-buffer-request`: the request goes to the host as it arrives (no waiting
  for the whole body); `option http-no-delay`: streamed tokens (SSE) go to the client as
  they come, not merged into larger packets. HAProxy never buffers a whole response.
- `timeout server` = the longest silence of a request at the host (a non-streamed generation
  sends nothing until it ends): gateway.upstream_timeout; `timeout client` the same for
  clients reading a long answer.
- `balance leastconn`: generations last seconds to minutes; the least busy host gets the next.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sovereignd.config import split_host_port
from sovereignd.errors import SovereigndError
from sovereignd.units import format_duration

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_PATH = re.compile(r"/[A-Za-z0-9/_.~?=&%-]*")


@dataclass(frozen=True)
class Node:
    """One sovereignd host: its name in HAProxy and its gateway's address."""

    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_node(text: str) -> Node:
    """`NAME=HOST:PORT` or `HOST:PORT` (named after the host and port); SovereigndError."""
    name, sep, address = text.rpartition("=")
    if not sep:
        address = text
    try:
        host, port = split_host_port(address)
    except ValueError as exc:
        raise SovereigndError(f"--node {text!r}: {exc}") from exc
    if not sep:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{host}_{port}").strip("_") or "node"
    if not _NAME.fullmatch(name):
        raise SovereigndError(f"--node {text!r}: a name is letters, digits and . _ - (up to 63)")
    if not re.fullmatch(r"[A-Za-z0-9.:-]+", host):
        raise SovereigndError(f"--node {text!r}: {host!r} is not a host name or address")
    return Node(name, host, port)


@dataclass(frozen=True)
class Options:
    """What the operator chooses; defaults suit hosts on one LAN."""

    listen: str = "127.0.0.1:8080"
    check_path: str = "/readyz"
    check_interval: float = 1.0      # inter; fastinter is half of it
    fall: int = 2
    rise: int = 2
    retries: int = 3
    request_timeout: float = 600.0   # gateway.upstream_timeout
    connect_timeout: float = 2.0
    stats_socket: str | None = None  # e.g. /run/haproxy/admin.sock
    maxconn: int = 4096


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def render(nodes: Sequence[Node], opts: Options = Options()) -> str:
    """The configuration text (haproxy.cfg); SovereigndError for unusable input."""
    if not nodes:
        raise SovereigndError("give at least one --node HOST:PORT")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise SovereigndError("two --node entries have the same name; name them NAME=HOST:PORT")
    try:
        split_host_port(opts.listen)
    except ValueError as exc:
        raise SovereigndError(f"--listen: {exc}") from exc
    if not _PATH.fullmatch(opts.check_path):
        raise SovereigndError(f"--check-path {opts.check_path!r}: a path such as /readyz or "
                              "/readyz?model=NAME")
    if opts.check_interval <= 0 or opts.fall < 1 or opts.rise < 1 or opts.retries < 0:
        raise SovereigndError("--check-interval must be positive, --fall and --rise at least "
                              "1, --retries 0 or more")
    inter = opts.check_interval
    stats = (f"    stats socket {opts.stats_socket} mode 600 level admin\n"
             if opts.stats_socket else "")
    servers = "".join(f"    server {n.name} {n.address} check\n" for n in nodes)
    worst = inter * opts.fall
    return f"""\
# HAProxy configuration for {len(nodes)} sovereignd host(s), written by `sovereignd fleet haproxy`.
# Check it with `haproxy -c -f FILE`. A host stops getting new requests at most about
# {format_duration(worst)} (inter x fall) after its /readyz turns 503; `sovereignd drain`
# keeps serving for its grace period (default 30s), far longer than that.
global
    maxconn {opts.maxconn}
    # One line per request to standard output (the journal under systemd).
    log stdout format raw daemon
{stats}
defaults
    mode http
    log global
    option httplog
    option dontlognull
    timeout connect {_ms(opts.connect_timeout)}
    timeout client {_ms(opts.request_timeout)}
    timeout server {_ms(opts.request_timeout)}
    timeout http-request 30s
    timeout http-keep-alive 15s
    timeout queue 30s

frontend sovereignd
    bind {opts.listen}
    # Requests go on as they arrive; streamed tokens leave as they come.
    no option http-buffer-request
    option http-no-delay
    default_backend sovereignd_hosts

backend sovereignd_hosts
    balance leastconn
    option httpchk
    http-check send meth GET uri {opts.check_path} ver HTTP/1.1 hdr Host sovereignd
    http-check expect status 200
    default-server inter {_ms(inter)} fastinter {_ms(inter / 2)} downinter {_ms(inter)} \
fall {opts.fall} rise {opts.rise}
    # Retried, each time on another host: requests no host answered (a failed connection, a
    # connection closed with no answer, sovereignd's 503 before the model server); a host that
    # died mid-request may have begun the generation, which runs again elsewhere (cost only).
    retries {opts.retries}
    retry-on conn-failure empty-response 503
    option redispatch 1
    no option http-buffer-request
    option http-no-delay
{servers}"""
