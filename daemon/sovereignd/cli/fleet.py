"""`fleet haproxy`: the load balancer's configuration for several hosts."""

from __future__ import annotations

import argparse
from pathlib import Path

from sovereignd.cli.common import EX_OK, duration_arg, emit
from sovereignd.errors import SovereigndError, UsageError


def _cmd_fleet_haproxy(args: argparse.Namespace) -> int:
    from sovereignd.fleet import haproxy

    # Every input is a command-line value: what render refuses is a usage error too.
    try:
        nodes = [haproxy.parse_node(text) for text in args.node]
        opts = haproxy.Options(
            listen=args.listen, check_path=args.check_path,
            check_interval=duration_arg(args.check_interval, "--check-interval"),
            fall=args.fall, rise=args.rise, retries=args.retries,
            request_timeout=duration_arg(args.request_timeout, "--request-timeout"),
            stats_socket=args.stats_socket)
        text = haproxy.render(nodes, opts)
    except SovereigndError as exc:
        raise UsageError(str(exc)) from exc
    emit(text.encode(), args.output)
    return EX_OK


def add_fleet(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fleet", help="configuration for several hosts behind a load balancer")
    fsub = p.add_subparsers(dest="fleet_cmd", required=True, metavar="ACTION")
    h = fsub.add_parser("haproxy", help="an HAProxy configuration that checks each host's "
                        "/readyz, retries only requests no host acted on, and streams")
    h.add_argument("--node", action="append", required=True, metavar="[NAME=]HOST:PORT",
                   help="a host's gateway.listen address (repeat for each host)")
    h.add_argument("--listen", required=True, metavar="ADDR:PORT",
                   help="where HAProxy listens for clients")
    h.add_argument("--check-path", default="/readyz",
                   help="health check path (default /readyz; /readyz?model=NAME per model)")
    h.add_argument("--check-interval", default="1s", metavar="DURATION",
                   help="time between checks of a host (inter; default 1s)")
    h.add_argument("--fall", type=int, default=2, help="failed checks that take a host out "
                   "(default 2)")
    h.add_argument("--rise", type=int, default=2, help="passed checks that bring it back "
                   "(default 2)")
    h.add_argument("--retries", type=int, default=3,
                   help="retries of a request no host acted on (default 3)")
    h.add_argument("--request-timeout", default="10m", metavar="DURATION",
                   help="longest silence of a request (timeout server/client; "
                        "gateway.upstream_timeout, default 10m)")
    h.add_argument("--stats-socket", metavar="PATH",
                   help="also open HAProxy's admin socket here (`show servers state`)")
    h.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="write here (atomically) instead of to stdout")
    h.set_defaults(handler=_cmd_fleet_haproxy)
