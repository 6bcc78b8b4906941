"""`logs init-key|verify|tail`: the request log's sealing key, its verification, and the logs
for a person."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from sovereignd.cli.common import EX_FAIL, EX_OK, config_arg, load_config
from sovereignd.errors import SovereigndError
from sovereignd.logs import sealing, verify


def _cmd_logs_init_key(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    key, state = sealing.init_key(cfg.state_dir, force=args.force)
    print(key.hex())
    print(f"sovereignd: sealing key id {state.key_id} written to "
          f"{sealing.state_path(cfg.state_dir)}. The line above is the verification key: "
          "give it to the auditor and keep it off this machine. It is shown only once; "
          "whoever holds it can check the records, and could also forge them.",
          file=sys.stderr)
    return EX_OK


def read_verification_keys(args: argparse.Namespace) -> list[bytes]:
    texts: list[str] = list(args.key or [])
    if args.key_file is not None:
        try:
            content = (sys.stdin.read() if str(args.key_file) == "-"
                       else args.key_file.read_text())
        except OSError as exc:
            raise SovereigndError(f"{args.key_file}: cannot read the key file: "
                                  f"{exc.strerror or exc}") from exc
        texts += [line for line in content.split() if line]
    keys = []
    for text in texts:
        try:
            keys.append(sealing.parse_key(text))
        except ValueError as exc:
            # Never echo the text: it may be a real key with a typo.
            raise SovereigndError(f"bad verification key: {exc}") from exc
    return keys


def _cmd_logs_verify(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    keys = read_verification_keys(args)
    result = verify.verify_logs(cfg.logs.dir, keys or None, cfg.state_dir,
                                   checkpoints=not args.no_checkpoints)
    if args.json:
        sys.stdout.write(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode()
                         + "\n")
    else:
        print(result.render())
    return EX_OK if result.ok else EX_FAIL


def _cmd_logs_tail(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    import signal
    import threading

    from sovereignd.logs import tail

    source = args.source or ("requests" if args.client is not None else "events")
    stop = threading.Event()
    if args.follow:
        # Ctrl-C or SIGTERM ends the follow after what was written so far is shown.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda _sig, _frame: stop.set())
    server_log = "server.log"
    if len(cfg.models) > 1 and (source == "server" or args.model is not None):
        # Several models: each server writes its own server.NAME.log.
        if args.model is None:
            raise SovereigndError("several models write server output: name one with --model "
                                  f"({', '.join(cfg.models)})")
        spec = cfg.models.get(args.model)
        if spec is None:
            raise SovereigndError(f"no model {args.model!r} in the configuration "
                                  f"({', '.join(cfg.models)})")
        source, server_log = "server", f"server.{spec.folder}.log"
    tail.tail(cfg.logs.dir, source, n=args.lines, follow=args.follow, client=args.client,
              stop=stop, server_log=server_log)
    return EX_OK


def add_logs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("logs", help="follow the logs; request-log sealing key and verification")
    lsub = p.add_subparsers(dest="logs_cmd", required=True, metavar="ACTION")
    i = lsub.add_parser("init-key", help="make the request log's sealing key; print the "
                        "verification key once, for the auditor")
    i.add_argument("--force", action="store_true",
                   help="replace an existing sealing key: records sealed so far then verify "
                        "only with the old verification key")
    config_arg(i)
    i.set_defaults(handler=_cmd_logs_init_key)
    v = lsub.add_parser("verify", help="check the request records are complete and unaltered")
    v.add_argument("--key", action="append", metavar="HEX",
                   help="verification key (64 hex digits; may be repeated after a change of "
                        "key). Visible to other users in `ps`: prefer --key-file")
    v.add_argument("--key-file", type=Path, metavar="PATH",
                   help="file with verification key(s), one per line; - reads standard input")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.add_argument("--no-checkpoints", action="store_true",
                   help="do not compare with the checkpoints in the event log")
    config_arg(v)
    v.set_defaults(handler=_cmd_logs_verify)
    t = lsub.add_parser("tail", help="show the logs for a person (aligned, coloured on a "
                        "terminal), following rotation with -f")
    which = t.add_mutually_exclusive_group()
    which.add_argument("--events", dest="source", action="store_const", const="events",
                       help="the daemon's events (the default)")
    which.add_argument("--requests", dest="source", action="store_const", const="requests",
                       help="the request records")
    which.add_argument("--server", dest="source", action="store_const", const="server",
                       help="the model server's output")
    t.add_argument("-f", "--follow", action="store_true",
                   help="keep showing new lines, across rotations, until Ctrl-C or SIGTERM")
    t.add_argument("-n", "--lines", type=int, default=10, metavar="N",
                   help="show the last N lines first (default 10; 0: only new ones)")
    t.add_argument("--client", metavar="NAME",
                   help="only the request records of this client (implies --requests)")
    t.add_argument("--model", metavar="NAME",
                   help="with several models: this model's server output (implies --server)")
    config_arg(t)
    t.set_defaults(handler=_cmd_logs_tail, source=None)
