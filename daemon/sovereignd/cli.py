"""The `sovereignd` command line. The only module that turns errors into exit statuses.

Exit statuses: 0 success; 1 a check failed or an unexpected error; 78 (EX_CONFIG) a bad
configuration. Each feature registers its subcommands with an `_add_*` function below.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sovereignd import __version__
from sovereignd import config as config_mod
from sovereignd.errors import CheckFailed, ConfigError, SovereigndError

EX_OK = 0
EX_FAIL = 1
EX_CONFIG = 78

Handler = Callable[[argparse.Namespace], int]


def _config_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", type=Path, required=required, metavar="PATH",
                   help="configuration file (YAML)")


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config)


# --- check / config ---------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd import preflight

    report = preflight.run_checks(cfg)
    print(report.render())
    return EX_OK if report.ok else EX_FAIL


def _cmd_config_example(_args: argparse.Namespace) -> int:
    print(config_mod.example_yaml())
    return EX_OK


def _cmd_config_describe(_args: argparse.Namespace) -> int:
    for key, default, doc in config_mod.describe():
        print(f"{key}  (default: {default})\n    {doc}")
    return EX_OK


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="validate the configuration and the host, then summarise")
    _config_arg(p)
    p.set_defaults(handler=_cmd_check)
    p = sub.add_parser("config", help="show the configuration's settings")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    e = csub.add_parser("example", help="print a commented example configuration")
    e.set_defaults(handler=_cmd_config_example)
    d = csub.add_parser("describe", help="list every setting with its default")
    d.set_defaults(handler=_cmd_config_describe)


# --- run / status / restart -------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd import daemon

    return daemon.run(cfg, allow_root=args.allow_root)


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd import control

    status = control.fetch_status(cfg)
    if args.json:
        sys.stdout.write(control.status_json(status) + "\n")
    else:
        print(control.render_status(status))
    return EX_OK if status.get("state") == "READY" else EX_FAIL


def _cmd_restart(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd import control

    print(control.request(cfg, "restart", reason=args.reason))
    return EX_OK


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the daemon in the foreground (launchd/systemd start this)")
    _config_arg(p)
    p.add_argument("--allow-root", action="store_true",
                   help="allow running as root (also daemon.allow_root in the configuration)")
    p.set_defaults(handler=_cmd_run)
    p = sub.add_parser("status", help="show the running daemon's state")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="print the JSON of /status")
    p.set_defaults(handler=_cmd_status)
    p = sub.add_parser(
        "restart", help="restart the server now (also leaves FATAL and resets the failure count)")
    _config_arg(p)
    p.add_argument("--reason", default="operator request", help="recorded in the event log")
    p.set_defaults(handler=_cmd_restart)


# --- parser and main ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovereignd",
        description="Run a local LLM server as a supervised, audited production service.")
    parser.add_argument("--version", action="version", version=f"sovereignd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_check):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"sovereignd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except CheckFailed as exc:
        print(f"sovereignd: {exc}", file=sys.stderr)
        return EX_FAIL
    except SovereigndError as exc:
        print(f"sovereignd: {exc}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `sovereignd ... | head`: the reader left; nothing more to say.
        return EX_OK


if __name__ == "__main__":
    sys.exit(main())
