"""`sovereignd logs tail`: columns for a person, colour only on a terminal, rotation followed
without losing or repeating a line."""

from __future__ import annotations

import io
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sovereignd.logs import tail
from sovereignd.logs.files import RotatingFile
from sovereignd.logs.records import iter_records
from tests.harness import Daemon, http
from tests.helpers import cli_argv, cli_env, run_cli, wait_for
from tests.reqlog_support import Clock, Events, Site, request

MakeDaemon = Callable[..., Daemon]

EVENT = {"ts": "2026-11-22T02:11:00.123Z", "level": "warning", "event": "state",
         "from": "READY", "to": "BACKOFF", "reason": "server exited with status 1"}


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_events_render_as_aligned_columns_with_key_values() -> None:
    line = tail.format_event(EVENT, tail.Style(False))
    assert line == ("2026-11-22 02:11:00.123  warning   state                 from=READY "
                    'to=BACKOFF reason="server exited with status 1"')
    short = tail.format_event({**EVENT, "event": "spawn", "level": "info"}, tail.Style(False))
    assert short.index("spawn") == line.index("state")  # the event column lines up


def test_requests_render_status_client_route_tokens_and_seq() -> None:
    rec = {"ts": "2026-11-22T02:11:00.123Z", "seq": 42, "kind": "request",
           **request(1, client="alice", latency_ms=12.34, prompt_tokens=7, completion_tokens=4),
           "prev": "0" * 64, "epoch": 0, "seal": "ab" * 32}
    line = tail.format_request(rec, tail.Style(False))
    assert line.startswith("2026-11-22 02:11:00.123  200  alice         POST "
                           "/v1/chat/completions model=my-model 12.3ms tokens=7+4 seq=42")
    assert "seal" not in line and "prev" not in line
    marker = tail.format_request({"ts": rec["ts"], "seq": 1, "kind": "open", "key_id": "k1",
                                  "prev": "0" * 64, "epoch": 0, "seal": None},
                                 tail.Style(False))
    assert marker == "2026-11-22 02:11:00.123  ---  [open]  seq=1 key_id=k1"


def test_colour_on_a_terminal_only_and_never_with_no_color(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert tail.use_color(Tty()) and not tail.use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not tail.use_color(Tty())
    coloured = tail.format_event(EVENT, tail.Style(True))
    assert "\x1b[33mwarning" in coloured and coloured.endswith("1\"")


def _tail(logs: Path, source: str, **kw: Any) -> tuple[tail.Tail, io.StringIO]:
    out = io.StringIO()
    return tail.Tail(tail.Source.of(source, logs), out, tail.Style(False), **kw), out


def test_follow_across_two_rotations_between_reads_loses_nothing(tmp_path: Path) -> None:
    """The live file is renamed twice before the follower looks: every line, once, in order."""
    f = RotatingFile(tmp_path / "events.log", max_bytes=400, keep=50)
    written: list[dict[str, Any]] = []

    def emit(n: int) -> None:
        for _ in range(n):
            ev = {"ts": "2026-11-22T02:11:00.123Z", "level": "info", "event": "probe_failed",
                  "n": len(written)}
            written.append(ev)
            f.write(ev)

    emit(3)
    t, out = _tail(tmp_path, "events")
    t.backlog(2)
    emit(12)  # several rotations of 400 bytes before the next poll
    t.poll()
    # A line being written shows only once complete.
    with (tmp_path / "events.log").open("ab") as live:
        live.write(b'{"ts":"2026-11-22T02:11:01.000Z","level":"info","event":"par')
        live.flush()
        t.poll()
        live.write(b'tial"}\n')
    t.poll()
    t.poll()
    t.close()
    f.close()
    shown = out.getvalue().splitlines()
    expected = [tail.format_event(e, tail.Style(False)) for e in written[1:]]
    assert shown[:-1] == expected
    assert shown[-1].split()[3] == "partial"
    assert len(tail.Source.of("events", tmp_path).rotated()) >= 2


def test_request_log_followed_across_compressed_rotations(tmp_path: Path) -> None:
    """Rotated request files are gzipped into new files; records still come once each."""
    site = Site(tmp_path)
    site.init_key()
    log = site.writer(clock=Clock(), events=Events(), rotate_bytes=2048, compress=True)
    for i in range(5):
        log.record(request(i))
    before = log.seq
    t, out = _tail(site.logs, "requests")
    t.backlog(3)
    for i in range(5, 40):
        log.record(request(i))
        if i % 9 == 0:
            assert log.wait_idle(10)
            t.poll()
    assert log.wait_idle(10)
    t.poll()
    log.close()
    t.poll()
    t.close()
    shown = [int(line.split("seq=")[1].split()[0]) for line in out.getvalue().splitlines()]
    last = max(r["seq"] for r in iter_records(site.logs, kinds=None))
    assert shown == list(range(last - len(shown) + 1, last + 1))
    assert shown[0] == before - 2  # the backlog's three, then every later record once
    assert any(p.name.endswith(".gz") for p in site.logs.iterdir())


def test_client_filter_and_backlog_from_rotated_files(tmp_path: Path) -> None:
    site = Site(tmp_path)
    log = site.writer(rotate_bytes=1024)
    for i in range(30):
        log.record(request(i))
    log.close()
    t, out = _tail(site.logs, "requests", client="bob")
    t.backlog(4)
    t.close()
    bob = [r for r in iter_records(site.logs) if r["client"] == "bob"]
    assert out.getvalue().splitlines() == [tail.format_request(r, tail.Style(False))
                                           for r in bob[-4:]]
    assert len(tail.Source.of("requests", site.logs).rotated()) > 1


def test_tail_refuses_client_without_requests(tmp_path: Path) -> None:
    with pytest.raises(tail.TailError, match="--client filters request records"):
        tail.tail(tmp_path, "events", client="alice")


def _stop_tail(proc: subprocess.Popen[bytes], signum: int) -> int:
    proc.send_signal(signum)
    return proc.wait(timeout=10)


def test_tail_f_follows_the_daemon_across_rotations(make_daemon: MakeDaemon,
                                                   tmp_path: Path) -> None:
    """Real daemon, tiny rotation sizes, `logs tail -f` as processes stopped by SIGTERM and
    SIGINT: their output is the logs' records, one for one."""
    d = make_daemon({"logs": {"max_bytes": "1KiB", "keep": 200},
                     "requests": {"rotate_bytes": "2KiB", "compress": True},
                     # auth_failed events are summarised per interval: keep them frequent.
                     "gateway": {"auth_event_interval": "100ms"}})
    alice = run_cli("keys", "add", "alice", "--config", str(d.config_path)).stdout.strip()
    bob = run_cli("keys", "add", "bob", "--config", str(d.config_path)).stdout.strip()
    d.start()
    d.wait_state("READY")
    chat = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert http("POST", d.url + "/v1/chat/completions", chat,
                {"Authorization": f"Bearer {alice}"})[0] == 200
    procs = {}
    for name, args in (("requests", ["--requests", "-n", "100000"]),
                       ("events", ["--events", "-n", "100000"]),
                       ("alice", ["--client", "alice", "-n", "1"])):
        out = (tmp_path / f"{name}.out").open("wb")
        procs[name] = (subprocess.Popen(
            cli_argv("logs", "tail", "-f", "--config", str(d.config_path), *args),
            stdout=out, stderr=subprocess.PIPE, env=cli_env({"NO_COLOR": ""})), out)
    outputs = {name: tmp_path / f"{name}.out" for name in procs}
    # Each tail has shown its backlog, so it holds the live file open before the traffic.
    for name in procs:
        wait_for(lambda n=name: outputs[n].read_bytes().count(b"\n") >= 1, 20,
                 what=f"the {name} tail's first lines")
    for i in range(60):
        who = [alice, bob, "sk-sov-" + "x" * 43][i % 3]  # the third fails: auth_failed events
        http("POST", d.url + "/v1/chat/completions", chat, {"Authorization": f"Bearer {who}"})
    assert d.stop() == 0
    expected = {
        "requests": list(tail.iter_rendered(d.logs, "requests")),
        "events": list(tail.iter_rendered(d.logs, "events")),
        "alice": [tail.format_request(r, tail.Style(False)) for r in iter_records(d.logs)
                  if r["client"] == "alice"],
    }
    assert len(tail.Source.of("requests", d.logs).rotated()) >= 5
    assert len(tail.Source.of("events", d.logs).rotated()) >= 3
    assert len(expected["alice"]) == 21
    for name in procs:
        wait_for(lambda n=name: outputs[n].read_text().count("\n") >= len(expected[n]), 20,
                 what=f"the {name} tail to catch up")
    for name, (proc, out) in procs.items():
        rc = _stop_tail(proc, signal.SIGINT if name == "alice" else signal.SIGTERM)
        out.close()
        assert rc == 0, proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        shown = outputs[name].read_text().splitlines()
        assert shown == expected[name], name
