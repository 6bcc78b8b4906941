"""The operator's side of key scopes and quotas: the `keys add/set` options that set them and
what `keys list` shows of them (the limits, and what each key used of them according to the
request records, as the daemon counts it)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sovereignd.gateway.quotas import LIMITS, Quota, QuotaBook, month_start
from sovereignd.gateway.scopes import parse_models
from sovereignd.logs.records import iter_records


def _models(text: str) -> tuple[str, ...]:
    try:
        return parse_models(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _limit(removable: bool) -> Callable[[str], int | None]:
    def parse(text: str) -> int | None:
        if removable and text.strip().lower() == "none":
            return None
        if not text.strip().isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(
                "a whole number of at least 1" + (" (or none to remove the limit)"
                                                  if removable else ""))
        return int(text)
    return parse


def add_scope_options(p: argparse.ArgumentParser, *, setting: bool) -> None:
    """`--models A,B` and the four quota options; with `setting` (keys set) also
    `--all-models`, and `none` removes a limit."""
    p.add_argument("--models", type=_models, default=None, metavar="A,B",
                   help="the only models this key may use (others get 403)")
    if setting:
        p.add_argument("--all-models", dest="models", action="store_const", const=(),
                       help="let the key use every model again")
    for name in LIMITS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_limit(setting),
                       default=argparse.SUPPRESS, metavar="N",
                       help=f"{name.replace('_', ' ')} (UTC); more get 429 until it resets"
                            + (" (none: no limit)" if setting else ""))


def limits_of(args: argparse.Namespace) -> dict[str, int | None]:
    """The quota options given on the command line: limit name -> value (None: remove)."""
    return {name: getattr(args, name) for name in LIMITS if hasattr(args, name)}


def used_from_records(logs_dir: Path, clients: Sequence[str]) -> dict[str, dict[str, int]]:
    """What each client used in the current UTC day and month, counted from the records as
    the daemon counts it for its quotas."""
    book = QuotaBook()
    book.load(iter_records(logs_dir, since=month_start(time.time())))
    return {name: book.usage(name) for name in clients}


def describe_quota(quota: Quota, used: dict[str, int] | None) -> str:
    """`tokens/day 120/1000, requests/month 3/50` or `-` for a key without limits."""
    if quota.unlimited:
        return "-"
    return ", ".join(f"{k.replace('_per_', '/')} {(used or {}).get(k, 0)}/{v}"
                     for k, v in quota.to_json().items())
