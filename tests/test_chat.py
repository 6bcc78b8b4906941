"""`sovereignd chat` driven in a pseudo-terminal, as an operator types, against the gateway in
front of the stand-in server: streaming, history, /status, /clear, /quit, the transcript, and
a key that never appears on the command line."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

from tests.helpers import cli_argv, cli_env
from tests.test_gateway import MakeDaemon, add_key


class Terminal:
    """A process on the slave side of a pty; `expect` reads until a text appears."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True)
        os.close(slave)
        self.seen = b""

    def expect(self, text: str, timeout: float = 20) -> str:
        """Output up to and including `text`; fails with what was seen after `timeout`."""
        deadline = time.monotonic() + timeout
        want = text.encode()
        while want not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} not seen; output so far: {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the process ended and the pty closed
                    chunk = b""
                assert chunk, f"{text!r} not seen before the end: {self.seen[-2000:]!r}"
                self.seen += chunk
        at = self.seen.index(want) + len(want)
        out, self.seen = self.seen[:at], self.seen[at:]
        return out.decode(errors="replace")

    def send(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=10)
        finally:
            os.close(self.master)


def test_chat_streams_keeps_history_and_obeys_its_commands_in_a_terminal(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d = make_daemon(behaviour={"default": {"stream_delay": 0.01}})
    key = add_key(d, "operator")
    d.start()
    d.wait_state("READY")
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    transcript = tmp_path / "chat.jsonl"
    argv = cli_argv("chat", "--config", str(d.config_path), "--key-file", str(key_file),
                    "--transcript", str(transcript), "--max-tokens", "3")
    assert key not in " ".join(argv)
    term = Terminal(argv, cli_env(None))
    try:
        assert "sovereignd chat with model" in term.expect("/quit\r\n")
        term.expect("> ")
        term.send("hello")
        assert " tok0 tok1 tok2" in term.expect("> ")  # the stand-in's streamed answer
        term.send("and again")
        term.expect("> ")
        term.send("/status")
        status = term.expect("> ")
        assert "ready" in status and "2 turns, 4 messages in history" in status
        assert "tokens 14 prompt + 6 completion" in status
        term.send("/clear")
        assert "[history cleared]" in term.expect("> ")
        term.send("/status")
        assert "0 messages in history" in term.expect("> ")
        term.send("/quit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()
    lines = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [(e["role"], e["model"]) for e in lines] == [
        ("user", "model"), ("assistant", "model"), ("user", "model"), ("assistant", "model")]
    assert lines[0]["content"] == "hello" and lines[1]["content"] == " tok0 tok1 tok2"
    assert oct(transcript.stat().st_mode & 0o777) == "0o600"
    # The gateway saw the history: the second request carried three messages.
    from sovereignd.logs.records import iter_records
    chats = [r for r in iter_records(d.logs) if r["path"] == "/v1/chat/completions"
             and r["client"] == "operator"]
    assert len(chats) == 2 and chats[1]["bytes_in"] > chats[0]["bytes_in"]


def test_chat_without_a_key_says_where_to_put_it(tmp_path: Path) -> None:
    env = {k: v for k, v in cli_env(None).items() if k != "SOVEREIGND_API_KEY"}
    res = subprocess.run(cli_argv("chat", "--url", "http://127.0.0.1:9"), capture_output=True,
                         text=True, env=env, timeout=60, check=False)
    assert res.returncode == 1
    assert "--key-file PATH or set SOVEREIGND_API_KEY" in res.stderr


def test_control_characters_in_an_answer_are_shown_escaped_and_kept_in_the_transcript(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """An answer holding `ESC [ 2 J` (clear screen) does not rewrite the operator's terminal:
    chat prints it escaped, as `logs tail` does; the transcript keeps what the model said."""
    d = make_daemon(behaviour={"default": {"token_text": "\x1b[2J"}})
    key = add_key(d, "operator")
    d.start()
    d.wait_state("READY")
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    transcript = tmp_path / "chat.jsonl"
    res = subprocess.run(cli_argv("chat", "--config", str(d.config_path), "--key-file",
                                  str(key_file), "--transcript", str(transcript),
                                  "--max-tokens", "2"),
                         input="hello\n/quit\n", capture_output=True, text=True,
                         env=cli_env(None), timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "\\x1b[2J0\\x1b[2J1" in res.stdout and "\x1b" not in res.stdout
    answer = [json.loads(line) for line in transcript.read_text().splitlines()][1]
    assert answer["content"] == "\x1b[2J0\x1b[2J1"

