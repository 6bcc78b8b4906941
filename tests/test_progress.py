"""The stall judgement: work without progress is suspected, then confirmed only with the
server's own counters; idle servers and moving counters are never suspected."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from sovereignd.process import system
from sovereignd.process.exitwatch import ExitWatch
from sovereignd.process.progress import ProgressWatch, ServerCounters, Verdict, parse_counters

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 2.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 70.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny"} 1234.0
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="tiny"} 1.7e+09
"""


def test_vllm_counters_are_read_and_other_text_is_none() -> None:
    assert parse_counters(VLLM_TEXT) == ServerCounters(tokens=1304.0, running=2.0)
    assert parse_counters("# nothing of vLLM here\nup 1\n") is None


def test_counters_under_a_type_line_without_total_are_read_too() -> None:
    # prometheus_client's parser leaves the family of `# TYPE vllm:generation_tokens counter`
    # empty and files its `_total` sample elsewhere (the stand-in's /metrics is written so):
    # read by sample name, the counters still move.
    text = ("# TYPE vllm:generation_tokens counter\n"
            'vllm:generation_tokens_total{model_name="m"} 14\n'
            "# TYPE vllm:prompt_tokens counter\n"
            'vllm:prompt_tokens_total{model_name="m"} 5\n')
    assert parse_counters(text) == ServerCounters(tokens=19.0, running=0.0)


def test_idle_is_never_a_stall() -> None:
    w = ProgressWatch(stall_timeout=8, stall_restart=25)
    assert w.look(0, busy=False) is Verdict.IDLE
    assert w.look(1000, busy=False) is Verdict.IDLE
    w.counters(1000, ServerCounters(1, 0))
    assert w.look(1001, busy=True) is Verdict.PROGRESS
    w.progress(1002)  # the work ended with an answer
    assert w.look(1003, busy=False) is Verdict.IDLE
    assert w.look(2000, busy=False) is Verdict.IDLE


def test_work_that_ended_without_progress_keeps_counting() -> None:
    """A canary that timed out leaves no work in flight, but no proof of health either: the
    silence goes on counting until the next progress."""
    w = ProgressWatch(stall_timeout=8, stall_restart=25)
    w.counters(0, ServerCounters(100, 1))
    assert w.look(1, busy=True) is Verdict.PROGRESS
    assert w.look(9.5, busy=True) is Verdict.SUSPECT
    assert w.look(31, busy=False) is Verdict.SUSPECT  # the canary gave up at 30 s
    assert w.look(34.1, busy=False) is Verdict.CONFIRMED
    w.progress(35)
    assert w.look(35.5, busy=False) is Verdict.IDLE


def test_work_without_progress_is_suspected_then_confirmed_by_the_counters() -> None:
    w = ProgressWatch(stall_timeout=8, stall_restart=25)
    w.counters(0, ServerCounters(100, 1))
    assert w.look(1, busy=True) is Verdict.PROGRESS
    w.counters(5, ServerCounters(100, 1))  # standing still
    assert w.look(9.5, busy=True) is Verdict.SUSPECT
    assert w.look(33.9, busy=True) is Verdict.SUSPECT
    assert w.look(34.1, busy=True) is Verdict.CONFIRMED
    w.counters(35, ServerCounters(101, 1))  # it moves again
    assert w.look(35, busy=True) is Verdict.PROGRESS


def test_without_counters_a_stall_is_only_suspected() -> None:
    """A long answer that is not streamed sends no byte: without the server's counters the
    watch never confirms (restarts) on silence alone."""
    w = ProgressWatch(stall_timeout=8, stall_restart=25)
    w.counters(0, None)
    w.progress(0)
    assert w.look(0, busy=True) is Verdict.PROGRESS
    assert w.look(100, busy=True) is Verdict.SUSPECT


def test_bytes_to_clients_are_progress() -> None:
    w = ProgressWatch(stall_timeout=8, stall_restart=25)
    w.counters(0, ServerCounters(5, 1))
    assert w.look(0, busy=True) is Verdict.PROGRESS
    for t in range(1, 60):
        w.progress(float(t))
        assert w.look(float(t) + 0.5, busy=True) is Verdict.PROGRESS


def test_exit_watch_reports_the_death_of_a_process_that_is_not_our_child() -> None:
    """A grandchild (re-parented when its parent exits) killed: reported once, by pidfd."""

    # The middle process starts a sleeper and exits: the sleeper is not our child.
    out = subprocess.run([sys.executable, "-c",
                          "import subprocess; p = subprocess.Popen(['sleep', '60'], "
                          "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
                          " print(p.pid)"], capture_output=True, text=True, check=True)
    pid = int(out.stdout)

    async def scenario() -> list[int]:
        ident = system.identify(pid)
        assert ident is not None
        died: list[int] = []
        done = asyncio.Event()

        def on_exit(i: system.ProcessId) -> None:
            died.append(i.pid)
            done.set()

        watch = ExitWatch(on_exit)
        watch.watch(ident)
        watch.watch(ident)  # twice: still one report
        os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(0.1)
        watch.close()
        return died

    died = asyncio.run(scenario())
    assert len(died) == 1
