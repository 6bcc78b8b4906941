"""What can go wrong talking to the model server: the upstream client's exceptions."""

from __future__ import annotations


class UpstreamError(Exception):
    """The model server could not be reached, or did not give a usable answer."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made: refused, no such socket file, unreachable, or the port's
    listener is not the server (the caller's `before_connect` check)."""


class UpstreamDisconnected(UpstreamError):
    """The connection closed or was reset before the response was complete."""


class UpstreamProtocolError(UpstreamError):
    """The server's bytes are not an HTTP/1.x response this client accepts. The message says
    what was wrong (llhttp's reason, or this client's rule) and never quotes the bytes: a
    body may carry generated text."""
