"""`sovereignd chat`: a terminal chat over the gateway with a client key, for operators trying
the service the way a client would.

A client of the gateway, not part of it: it speaks the OpenAI chat API over HTTP (stdlib
http.client), streams the answer as it arrives, and keeps the conversation's history until
`/clear`. The key comes from a file or the SOVEREIGND_API_KEY environment variable, never
from the command line (where `ps` shows it to every local user). Commands: `/clear` (forget
the history), `/status` (the gateway's readiness, the model, the turns and tokens so far),
`/quit` (or end of input). With `--transcript FILE` each turn is appended to FILE as one JSON
line (`{"ts", "role", "content", "model"}`), a file of the user's own (mode 0600).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException, HTTPResponse
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import orjson

from sovereignd.errors import SovereigndError
from sovereignd.textsafe import escape, escape_text

KEY_ENV = "SOVEREIGND_API_KEY"
HELP = "commands: /clear (forget the conversation), /status, /quit"
# A local gateway answers at once; a long generation streams, each chunk resets the timer.
TIMEOUT = 600.0


class ChatError(SovereigndError):
    """The chat cannot start: no key, a bad URL, or a gateway that does not answer."""


def read_key(key_file: Path | None) -> str:
    """The client key from `key_file` (first line) or $SOVEREIGND_API_KEY; ChatError if neither."""
    if key_file is not None:
        try:
            text = key_file.read_text().strip()
        except OSError as exc:
            raise ChatError(f"{key_file}: cannot read the key file: {exc.strerror or exc}") \
                from exc
        if not text:
            raise ChatError(f"{key_file}: the key file is empty")
        return text.splitlines()[0].strip()
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise ChatError(f"no client key: give --key-file PATH or set {KEY_ENV} (never the key "
                        "itself on the command line)")
    return key


@dataclass
class Session:
    """One conversation with the gateway."""

    url: str
    key: str
    model: str | None
    out: TextIO
    max_tokens: int | None = None
    transcript: Path | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def _connect(self) -> HTTPConnection:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ChatError(f"--url must be http://HOST:PORT, got {self.url!r}")
        return HTTPConnection(parts.hostname, parts.port or 80, timeout=TIMEOUT)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None
                 ) -> tuple[HTTPConnection, HTTPResponse]:
        conn = self._connect()
        headers = {"Authorization": f"Bearer {self.key}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            return conn, conn.getresponse()
        except (OSError, HTTPException) as exc:
            conn.close()
            raise ChatError(f"the gateway at {self.url} does not answer: {exc}") from exc

    def _get_json(self, path: str) -> tuple[int, Any]:
        conn, resp = self._request("GET", path)
        try:
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, None

    def choose_model(self) -> str:
        """The --model given, else the first model the key may use (GET /v1/models)."""
        if self.model:
            return self.model
        status, doc = self._get_json("/v1/models")
        if status != 200:
            raise ChatError(f"GET /v1/models answered {status}: {_message(doc)}")
        models = [m.get("id") for m in (doc or {}).get("data", []) if isinstance(m, dict)]
        if not models:
            raise ChatError("this key may use no model (GET /v1/models lists none)")
        self.model = str(models[0])
        return self.model

    def ask(self, text: str) -> None:
        """Send the history and `text`, stream the answer to `out`; a refused turn is not kept."""
        model = self.choose_model()
        messages = [*self.history, {"role": "user", "content": text}]
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        conn, resp = self._request("POST", "/v1/chat/completions", body)
        try:
            if resp.status != 200:
                doc = _json_or_none(resp.read())
                self.out.write(f"[error {resp.status}: {escape(_message(doc))}]\n")
                return
            parts: list[str] = []
            for event in _events(resp):
                delta = _delta(event)
                if delta:
                    parts.append(delta)
                    # The model's text may hold control characters (ESC sequences rewrite
                    # the terminal): shown escaped, kept as sent in history and transcript.
                    self.out.write(escape_text(delta))
                    self.out.flush()
                usage = event.get("usage")
                if isinstance(usage, dict):
                    self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                    self.completion_tokens += int(usage.get("completion_tokens") or 0)
            self.out.write("\n")
        except (OSError, HTTPException) as exc:
            self.out.write(f"\n[the answer was cut: {exc}]\n")
            return
        finally:
            conn.close()
        answer = "".join(parts)
        self.history = [*messages, {"role": "assistant", "content": answer}]
        self.turns += 1
        self._log("user", text)
        self._log("assistant", answer)

    def status(self) -> str:
        """One line: the gateway's readiness, the model, turns and tokens of this session."""
        code, doc = self._get_json("/readyz")
        state = (doc or {}).get("state") if isinstance(doc, dict) else None
        ready = "ready" if code == 200 else f"not ready ({state or code})"
        return (f"gateway {self.url}: {ready}; model {self.model or '-'}; {self.turns} turns, "
                f"{len(self.history)} messages in history; tokens {self.prompt_tokens} prompt "
                f"+ {self.completion_tokens} completion")

    def clear(self) -> None:
        self.history = []

    def _log(self, role: str, content: str) -> None:
        if self.transcript is None:
            return
        line = orjson.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "role": role, "content": content, "model": self.model})
        fd = os.open(self.transcript, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, line + b"\n")
        finally:
            os.close(fd)


def run(session: Session, stdin: TextIO = sys.stdin) -> None:
    """The read-answer loop until /quit or end of input."""
    out = session.out
    out.write(f"sovereignd chat with {session.choose_model()} at {session.url}. {HELP}\n")
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return
        if text == "/clear":
            session.clear()
            out.write("[history cleared]\n")
        elif text == "/status":
            out.write(session.status() + "\n")
        elif text.startswith("/"):
            out.write(f"[unknown command {text.split()[0]}; {HELP}]\n")
        else:
            session.ask(text)


def _events(resp: HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent-events stream, as they arrive, until `[DONE]`."""
    while True:
        raw = resp.readline()
        if not raw:
            return
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        doc = _json_or_none(data)
        if isinstance(doc, dict):
            yield doc


def _delta(event: dict[str, Any]) -> str:
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _message(doc: Any) -> str:
    """The message of an OpenAI- or Anthropic-shaped error object."""
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return str(doc["error"].get("message") or doc["error"])
    return "no error message"
