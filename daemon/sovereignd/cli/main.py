"""The parser, and `main`: the one place that turns errors into exit statuses.

Exit statuses: 0 success; 1 a check failed or an unexpected error; 2 a command line that
cannot be used (argparse's usage errors, and option values such as a duration or a date that
do not parse); 78 (EX_CONFIG) a bad
configuration, of the file or of the host (`guards`: running as root, protected files the
service account could change). Each command group's module registers its subcommands with its
`add_*` functions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from sovereignd import __version__
from sovereignd.cli import audit, chat, control, fleet, integrity, keys, logs, service
from sovereignd.cli.common import EX_BROKEN_PIPE, EX_CONFIG, EX_FAIL, EX_USAGE, Handler
from sovereignd.errors import CheckFailed, ConfigError, SovereigndError, UnsafeHost, UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovereignd",
        description="Run a local LLM server as a supervised, audited production service.")
    parser.add_argument("--version", action="version", version=f"sovereignd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # This order is the order of `sovereignd --help`.
    for add in (control.add_run, service.add_check, integrity.add_manifest, integrity.add_model,
                integrity.add_env, integrity.add_baseline, keys.add_keys, logs.add_logs,
                audit.add_audit, service.add_service, service.add_firewall, service.add_upgrade,
                control.add_drain, fleet.add_fleet, chat.add_chat):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        return _say(args, exc, EX_CONFIG)
    except UnsafeHost as exc:
        # The host's setup is configuration too: 78 keeps systemd from restarting in a loop.
        return _say(args, exc, EX_CONFIG)
    except UsageError as exc:
        return _say(args, exc, EX_USAGE,
                    hint=f" (see sovereignd {args.command} --help)")
    except CheckFailed as exc:
        return _say(args, exc, EX_FAIL)
    except SovereigndError as exc:
        return _say(args, exc, EX_FAIL)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `sovereignd ... | head`: the reader left before the verdict could be written, so
        # the verdict is unknown to it: fail as a tool killed by SIGPIPE does (128 + 13), never
        # 0 — a check whose output was cut must not read as passed under `set -o pipefail`.
        # Python would flush stdout again at exit and complain: point it at /dev/null.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EX_BROKEN_PIPE
    except OSError as exc:
        # e.g. stdout on a full disk (ENOSPC): a sentence, not a traceback.
        return _say(args, f"{exc.strerror or exc}"
                    + (f": {exc.filename}" if exc.filename else ""), EX_FAIL)


def _say(args: argparse.Namespace, error: object, status: int, hint: str = "") -> int:
    """Tell why the command ends with `status`: a sentence on stderr, or for `run` -- the
    daemon, whose every stderr line is a JSON event (launchd/journald keep them) -- the event
    `daemon_exit` with the error and the status. Returns `status`."""
    if args.command == "run":
        from sovereignd.logs.eventlog import EventLog

        EventLog(None).emit("daemon_exit", level="error", error=str(error),
                            exit_status=status)
    else:
        cmd = f" {args.command}" if hint else ""
        print(f"sovereignd{cmd}: {error}{hint}", file=sys.stderr)
    return status
