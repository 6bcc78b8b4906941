"""`run`, `status`, `restart`, `drain` and `resume`: the daemon in the foreground, and the
running one through its control socket."""

from __future__ import annotations

import argparse
import sys

from sovereignd.cli.common import EX_FAIL, EX_OK, config_arg, duration_arg, load_config


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from sovereignd import daemon

    return daemon.run(cfg, allow_root=args.allow_root)


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from sovereignd.gateway import control

    status = control.fetch_status(cfg)
    if args.json:
        sys.stdout.write(control.status_json(status) + "\n")
    else:
        print(control.render_status(status))
    return EX_OK if status.get("state") == "READY" else EX_FAIL


def _cmd_restart(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from sovereignd.gateway import control

    extra = {"model": args.model} if args.model else {}
    print(control.request(cfg, "restart", reason=args.reason, **extra))
    return EX_OK


def add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the daemon in the foreground (launchd/systemd start this)")
    config_arg(p)
    p.add_argument("--allow-root", action="store_true",
                   help="allow running as root (also daemon.allow_root in the configuration)")
    p.set_defaults(handler=_cmd_run)
    p = sub.add_parser("status", help="show the running daemon's state")
    config_arg(p)
    p.add_argument("--json", action="store_true", help="print the JSON of /status")
    p.set_defaults(handler=_cmd_status)
    p = sub.add_parser("restart", help="restart the server now (also leaves FATAL and resets "
                       "the failure count)")
    config_arg(p)
    p.add_argument("--reason", default="operator request", help="recorded in the event log")
    p.add_argument("--model", metavar="NAME",
                   help="with several models: restart only this model's server")
    p.set_defaults(handler=_cmd_restart)


def _cmd_drain(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from sovereignd.gateway import control, drain

    grace = duration_arg(args.grace, "--grace")
    print(control.call(cfg, "drain", grace=grace, reason=args.reason)["message"])
    if args.no_wait:
        return EX_OK
    timeout = grace + (duration_arg(args.timeout, "--timeout") if args.timeout is not None
                       else cfg.gateway.upstream_timeout)
    drain.wait_drained(cfg, timeout, print)
    print("drained: no request in flight and new ones are refused; `sovereignd resume` "
          "serves again")
    return EX_OK


def _cmd_resume(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from sovereignd.gateway import control

    print(control.request(cfg, "resume", reason=args.reason))
    return EX_OK


def add_drain(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("drain", help="take this host out of a load balancer for maintenance: "
                       "/readyz 503 'draining', requests still served for --grace, then refused")
    config_arg(p)
    p.add_argument("--grace", default="30s", metavar="DURATION",
                   help="how long new requests are still served, for the balancer to notice "
                        "(default 30s; longer than its health check's inter x fall)")
    p.add_argument("--reason", default="operator drain", help="recorded in the event log")
    p.add_argument("--no-wait", action="store_true",
                   help="return at once instead of waiting for the grace period and the "
                        "requests in flight to end")
    p.add_argument("--timeout", metavar="DURATION",
                   help="how long to wait past the grace period for requests in flight "
                        "(default gateway.upstream_timeout)")
    p.set_defaults(handler=_cmd_drain)
    p = sub.add_parser("resume", help="end a drain: /readyz follows the server's state again")
    config_arg(p)
    p.add_argument("--reason", default="operator resume", help="recorded in the event log")
    p.set_defaults(handler=_cmd_resume)
