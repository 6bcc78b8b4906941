"""What the command groups share: the exit statuses, `--config`, durations and `--output`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from sovereignd import config as config_mod
from sovereignd.errors import UsageError

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 2  # argparse's own status for a command line it cannot use
EX_CONFIG = 78
EX_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it

Handler = Callable[[argparse.Namespace], int]


def config_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", type=Path, required=required, metavar="PATH",
                   help="configuration file (YAML)")


def load_config(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config)


def duration_arg(text: str, flag: str) -> float:
    from sovereignd.units import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from exc


def emit(text: bytes, output: Path | None) -> None:
    """Write to --output atomically (mode 0644, as service files are installed) or stdout."""
    if output is None:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
        return
    from sovereignd.fsutil import atomic_write

    atomic_write(output, text, mode=0o644)
