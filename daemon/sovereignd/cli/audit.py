"""`audit`, `audit export` and `audit fleet`: the compliance report of one host or of several."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sovereignd.cli.common import EX_FAIL, EX_OK, config_arg, load_config
from sovereignd.cli.logs import read_verification_keys
from sovereignd.errors import SovereigndError, UsageError
from sovereignd.gateway import keys as keys_mod
from sovereignd.logs import sealing


def _cmd_audit(args: argparse.Namespace) -> int:
    if args.config is None:
        raise UsageError("audit needs --config FILE (or: audit export, audit fleet)")
    cfg = load_config(args)
    from sovereignd.audit import render
    from sovereignd.audit.report import build_report

    since, until = _period_args(args)
    fmt = args.format or render.format_for(args.output)
    report = build_report(cfg, since, until,
                          verification_keys=read_verification_keys(args))
    text = render.render(report, fmt)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from sovereignd.fsutil import atomic_write

        try:
            atomic_write(args.output, text.encode(), mode=0o644)
        except OSError as exc:
            raise SovereigndError(f"{args.output}: cannot write the report: "
                                  f"{exc.strerror or exc}") from exc
        print(f"sovereignd: audit report written to {args.output}: {report.summary()}",
              file=sys.stderr)
    return EX_FAIL if report.failed else EX_OK


def _period_args(args: argparse.Namespace) -> tuple[float | None, float | None]:
    from sovereignd.audit import evidence

    try:
        since = evidence.parse_date(args.since, "--since") if args.since else None
        until = (evidence.parse_date(args.until, "--until", end_of_day=True) if args.until
                 else None)
    except evidence.AuditError as exc:
        raise UsageError(str(exc)) from exc
    return since, until


def _cmd_audit_export(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from sovereignd.audit import export

    since, until = _period_args(args)
    if args.name is not None and not keys_mod.NAME_PATTERN.fullmatch(args.name):
        raise UsageError(f"--name {args.name!r}: use letters, digits and . _ @ -")
    done = export.export(cfg, args.output, since, until, name=args.name)
    head = done.sealing_head or {}
    print(f"sovereignd: audit export written to {done.path}: {done.members} files, "
          f"{done.size} bytes; sealing key id {head.get('key_id', 'none')}. Its records are "
          "verified with this host's verification key: `sovereignd audit fleet FILE... "
          "--key-file HOST=KEYFILE`", file=sys.stderr)
    return EX_OK


def _host_keys(specs: list[str]) -> dict[str, list[bytes]]:
    """--key-file HOST=PATH, repeatable: each host's verification key(s), one per line."""
    out: dict[str, list[bytes]] = {}
    for spec in specs:
        host, sep, path = spec.partition("=")
        if not sep or not host or not path:
            raise UsageError(f"--key-file {spec!r}: expected HOST=FILE")
        try:
            texts = Path(path).read_text().split()
        except OSError as exc:
            raise SovereigndError(f"--key-file {host}: cannot read {path}: "
                                  f"{exc.strerror or exc}") from exc
        try:
            out.setdefault(host, []).extend(sealing.parse_key(t) for t in texts if t)
        except ValueError as exc:
            raise SovereigndError(f"--key-file {host}: bad verification key: {exc}") from exc
    return out


def _cmd_audit_fleet(args: argparse.Namespace) -> int:
    from sovereignd.audit import fleet, render

    since, until = _period_args(args)
    report = fleet.audit_fleet(args.exports, _host_keys(args.key_file), since, until)
    fmt = args.format or render.format_for(args.output)
    text = fleet.render(report, fmt)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from sovereignd.fsutil import atomic_write

        atomic_write(args.output, text.encode(), mode=0o644)
        print(f"sovereignd: fleet audit written to {args.output}: {report.summary()}",
              file=sys.stderr)
    return EX_FAIL if report.failed else EX_OK


def _add_audit_fleet(p: argparse.ArgumentParser) -> None:
    """`audit export` and `audit fleet`, as subcommands of `audit` (plain `audit` still reports
    on this host)."""
    asub = p.add_subparsers(dest="audit_cmd", metavar="[export|fleet]")
    e = asub.add_parser("export", help="pack this host's evidence (logs, checkpoints, "
                        "baselines, configuration digest, host facts) into one file")
    config_arg(e)
    for q in (e, f := asub.add_parser(
            "fleet", help="verify several hosts' exports and report on them as one fleet")):
        q.add_argument("--since", metavar="DATE", help="start of the period (ISO 8601 UTC)")
        q.add_argument("--until", metavar="DATE", help="end of the period (exclusive)")
    e.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                   help="the export to write (a .tar.gz)")
    e.add_argument("--name", help="the host's name in the fleet report (default: its host "
                   "name)")
    e.set_defaults(handler=_cmd_audit_export)
    f.add_argument("exports", nargs="+", type=Path, metavar="FILE", help="audit export files")
    f.add_argument("--key-file", action="append", default=[], metavar="HOST=FILE",
                   help="a host's verification key(s), one per line (repeat per host; HOST "
                        "is its name in the export (audit export --name, default the host "
                        "name) or the export file's name without .gz)")
    f.add_argument("--format", choices=("md", "html", "json"),
                   help="md, html (one self-contained page) or json; default: from the -o "
                        "suffix, else md")
    f.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write the report here instead of standard output")
    f.set_defaults(handler=_cmd_audit_fleet)


def add_audit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "audit", help="compliance report for a period: one PASS/FAIL line per control "
        "with its evidence (exit 1 if a control fails)")
    config_arg(p, required=False)  # (audit fleet reads exports, not a configuration)
    p.add_argument("--since", metavar="DATE",
                   help="start of the period, ISO 8601 UTC (2026-11-01 or 2026-11-01T08:00Z); "
                        "default: the oldest kept log")
    p.add_argument("--until", metavar="DATE",
                   help="end of the period (exclusive); a bare date includes that whole day; "
                        "default: now")
    p.add_argument("--format", choices=("md", "html", "json"),
                   help="md (a ticket), html (one self-contained file with charts) or json "
                        "(tools); default: from the -o suffix, else md")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write the report here instead of standard output")
    p.add_argument("--key-file", type=Path, metavar="PATH",
                   help="the auditor's verification key(s), one per line (- reads standard "
                        "input): the request records' seals are checked with them")
    p.set_defaults(handler=_cmd_audit, key=None)
    _add_audit_fleet(p)
