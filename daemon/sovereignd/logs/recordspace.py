"""Disk space of the request records, watched: a gauge and an event before space runs out.

Request records are written until the disk is full, and then the gateway fails closed. With
`requests.max_total_bytes` the rotated files stay under a cap; this watch says so before
either limit matters: `requests.space_low` (once an hour while it lasts, and at once when it
begins) when the log folder's file system has less than `requests.warn_free_bytes` free or the
request files pass 80 % of the cap, `requests.space_ok` when that ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sovereignd.config import Config

NEAR_CAP = 0.8
REPEAT = 3600.0  # seconds between repeated warnings while space stays low


def usage(logs_dir: Path) -> tuple[int, int]:
    """(bytes of request files in `logs_dir`, bytes free to this account on its file system)."""
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(logs_dir) as entries:
        for e in entries:
            if e.name.startswith("requests") and e.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    total += e.stat(follow_symlinks=False).st_size
    st = os.statvfs(logs_dir)
    return total, st.f_bavail * st.f_frsize


async def watch(cfg: Config, emit: Callable[..., None], set_gauges: Callable[[int, int], None],
                stop: asyncio.Event, interval: float = 30.0) -> None:
    """Every `interval` seconds until `stop`: update the gauges, warn when space is low."""
    r = cfg.requests
    warned_at: float | None = None
    while not stop.is_set():
        try:
            used, free = await asyncio.to_thread(usage, cfg.logs.dir)
        except OSError as exc:
            emit("requests.space_unknown", level="warning", error=str(exc))
            used, free = -1, -1
        if used >= 0:
            set_gauges(used, free)
            problems: dict[str, Any] = {}
            if free < r.warn_free_bytes:
                problems["free_bytes"] = free
            if r.max_total_bytes and used > NEAR_CAP * r.max_total_bytes:
                problems["near_cap"] = True
            now = time.monotonic()
            if problems and (warned_at is None or now - warned_at >= REPEAT):
                emit("requests.space_low", level="warning", used_bytes=used, free_bytes=free,
                     warn_free_bytes=r.warn_free_bytes, max_total_bytes=r.max_total_bytes,
                     action="free disk space, or lower requests.max_total_bytes / max_age; "
                            "when no record can be written the gateway refuses requests")
                warned_at = now
            elif not problems and warned_at is not None:
                emit("requests.space_ok", used_bytes=used, free_bytes=free)
                warned_at = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
