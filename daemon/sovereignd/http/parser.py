"""Framing of the model server's responses by llhttp (through httptools, as uvicorn and aiohttp
use it): status line, header section, and a body delimited by Content-Length, the chunked
transfer-coding or the connection's close.

llhttp is strict by default (none of httptools' `set_dangerous_leniencies` is set): every line
ends in CRLF (a bare LF or CR is refused, so a head with LF-only line ends is refused at once,
not waited on), Content-Length with Transfer-Encoding, a repeated or non-numeric Content-Length,
obs-fold, whitespace before a colon, control characters and malformed chunk lines are refused
(llhttp README, "Strict mode"; RFC 9112 §2.2, §5.2, §6.3). On top of it this module refuses
what llhttp lets through but this client does not want: an HTTP version other than 1.0 and
1.1, a transfer-coding other than exactly `chunked` (llhttp would read such a response to the
close), 101 Switching Protocols, control characters in the reason phrase, more than
`MAX_HEADERS` fields and a head larger than the caller's limit (llhttp has no size limits).

llhttp does not know the request's method, so the body of an answer to HEAD is skipped here:
the head completes the response, and the llhttp parser is replaced before the next response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Protocol

import httptools

from sovereignd.http.errors import UpstreamError, UpstreamProtocolError

MAX_HEADERS: Final = 256
_REASON_FORBIDDEN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# What the parser is waiting for.
IDLE, HEAD, BODY, UNTIL_CLOSE = range(4)


class ResponseSink(Protocol):
    """Where a framed response goes (the connection that carries it)."""

    def head_received(self, head: ResponseHead) -> None:
        """The final response's head arrived (interim 1xx heads are skipped)."""

    def body_received(self, data: bytes) -> None:
        """Body bytes, as they arrive (transfer-coding removed)."""

    def message_complete(self) -> None:
        """The response ended by its framing (not for until-close bodies: see `eof`)."""


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A response's status line and header fields, and how its body is framed."""

    status: int
    reason: str
    version: int  # 10 or 11
    headers: list[tuple[str, str]]  # in order; values without surrounding blanks
    content_length: int | None
    keep_alive: bool  # HTTP/1.1, no `Connection: close`, not delimited by the close


class ResponseParser:
    """The responses on one connection. `expect()` before each request's bytes are sent,
    `feed()` with what arrives; the sink hears the head, the body and the end.
    `feed()` raises UpstreamProtocolError for a response it refuses."""

    __slots__ = ("_content_length", "_head_bytes", "_head_only", "_headers", "_interim",
                 "_max_head", "_parser", "_reason", "_skip", "_te", "received", "remaining",
                 "sink", "state")

    def __init__(self, sink: ResponseSink, max_head_bytes: int) -> None:
        self.sink = sink
        self._max_head = max_head_bytes
        self._parser = httptools.HttpResponseParser(self)
        self.state = IDLE
        self.received = False  # any byte of the expected response
        self.remaining = 0  # Content-Length body bytes still to come
        self._head_only = False
        self._skip = False  # the rest of a HEAD answer's llhttp message is not ours
        self._reset_head()

    def _reset_head(self) -> None:
        self._headers: list[tuple[str, str]] = []
        self._reason = ""
        self._content_length: int | None = None
        self._te: list[str] = []
        self._head_bytes = 0
        self._interim = False

    def expect(self, head_only: bool) -> None:
        """A request was sent; `head_only` for HEAD, whose answer has no body."""
        self.state = HEAD
        self.received = False
        self._head_only = head_only
        self._reset_head()

    def feed(self, data: bytes) -> None:
        """Parse `data`; the sink's methods are called from inside."""
        if self.state == HEAD:
            self.received = True
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            reason = exc.__context__
            if isinstance(reason, UpstreamError):
                raise reason from None
            raise  # a bug of ours, not the server's
        except httptools.HttpParserError as exc:
            where = "head" if self.state in (HEAD, IDLE) else "body"
            raise UpstreamProtocolError(f"malformed response {where}: {exc}") from None
        if self._skip:
            # A HEAD answer: the llhttp parser expects a body that will not come.
            self._skip = False
            self._parser = httptools.HttpResponseParser(self)
        if self.state == HEAD and self._head_bytes > self._max_head + 4:
            raise UpstreamProtocolError(f"response head larger than {self._max_head} bytes")

    # --- llhttp's callbacks (httptools.parser.protocol.HTTPProtocol) ---------------------------

    def on_message_begin(self) -> None:
        if self.state != HEAD or self._skip:
            raise UpstreamProtocolError("the server sent bytes that answer no request")

    def on_status(self, status: bytes) -> None:
        if _REASON_FORBIDDEN.search(status):
            raise UpstreamProtocolError("control character in the reason phrase")
        self._reason = status.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            raise UpstreamProtocolError(f"more than {MAX_HEADERS} header fields")
        key = name.decode("ascii")  # llhttp admits only token characters
        text = value.rstrip(b" \t").decode("utf-8", "surrogateescape")
        headers.append((key, text))
        if len(name) == 14 and key.lower() == "content-length":
            self._content_length = int(text)  # llhttp checked: digits, one field, no overflow
        elif len(name) == 17 and key.lower() == "transfer-encoding":
            self._te.append(text)

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if self._head_bytes > self._max_head and self._head_size() > self._max_head:
            raise UpstreamProtocolError(f"response head larger than {self._max_head} bytes")
        if status < 200:
            if status == 101:
                raise UpstreamProtocolError("101 Switching Protocols was not asked for")
            self._interim = True  # 100 Continue, 103 Early Hints: the final one follows
            return
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise UpstreamProtocolError(f"HTTP/{version} is not HTTP/1.x")
        chunked = False
        if self._te:
            if len(self._te) != 1 or self._te[0].lower() != "chunked":
                raise UpstreamProtocolError("unsupported Transfer-Encoding (only chunked)")
            chunked = True
        length = self._content_length
        keep_alive = version == "1.1" and parser.should_keep_alive()
        no_body = self._head_only or status in (204, 304)
        if no_body:
            self.state = IDLE
        elif chunked or length is not None:
            self.state = BODY
            self.remaining = length or 0
        else:
            self.state = UNTIL_CLOSE
            keep_alive = False
        self.sink.head_received(ResponseHead(status, self._reason, 11 if version == "1.1" else 10,
                                             self._headers, length, keep_alive))
        if self._head_only:
            self._skip = True
            self.sink.message_complete()

    def on_body(self, body: bytes) -> None:
        if self._skip:
            raise UpstreamProtocolError("the server sent bytes that answer no request")
        if self.remaining:
            self.remaining -= len(body)
        self.sink.body_received(body)

    def on_message_complete(self) -> None:
        if self._skip:
            return  # (a HEAD answer's Content-Length: 0 or the like: ended already)
        if self._interim:
            self._reset_head()
            self.state = HEAD
            return
        self.state = IDLE
        self.sink.message_complete()

    def _head_size(self) -> int:
        """The head's size as parsed: a close bound from below (line ends and ': ')."""
        return 17 + len(self._reason) + sum(len(k) + len(v) + 4 for k, v in self._headers)
