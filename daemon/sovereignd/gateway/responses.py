"""OpenAI's Responses API with stored responses bound to the client that made them.

vLLM 0.32 serves `POST /v1/responses`, `GET /v1/responses/{id}` and `POST
/v1/responses/{id}/cancel` (vllm/entrypoints/openai/responses/api_router.py) and, with
VLLM_ENABLE_RESPONSES_API_STORE=1, keeps responses in memory under their id for anyone with
the server's key: behind one internal key, every client could read or cancel every other
client's responses, continue from them (`previous_response_id`), or overwrite one by sending
its id as `request_id` (vLLM takes the stored id from that body field). Here the gateway
remembers which client each response id came back to, and answers 404 -- as for an id that
does not exist, so ids are not confirmed to strangers -- to any other client that names it.
The binding lives in the daemon's memory, as the stored responses live in the server's, and
is not written to disk: it could not outlive the responses themselves. The daemon stops its
server when it exits (and stops a previous daemon's leftover server before it starts one), so
every daemon restart is also a server restart, whose store starts empty. A forgotten id is
answered 404 in OpenAI's shape saying so (NOT_KEPT); after a restart of the server alone
(the daemon kept running) vLLM answers its own 404 for ids the daemon still remembers.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import orjson

PATH = "/v1/responses"
# `/v1/responses/{id}` (GET) and `/v1/responses/{id}/cancel` (POST).
_BY_ID = re.compile(r"/v1/responses/([A-Za-z0-9_.:-]{1,200})(/cancel)?")
# Response ids remembered; the oldest are forgotten first (vLLM's store keeps every one, but
# the daemon's memory stays bounded).
MAX_OWNED = 100_000
# Added to every "not found" for an id: the same words whether the id never existed, belongs
# to another client or was forgotten, so nothing is confirmed to a stranger.
NOT_KEPT = ("Stored responses are kept in the model server's memory only: a restart of the "
            "server or of sovereignd forgets them.")


class Owners:
    """Response id -> the client it belongs to and the model that made it (so that a read
    or cancel, which names no model, goes to the server that holds the response)."""

    def __init__(self, limit: int = MAX_OWNED) -> None:
        self._owner: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self._limit = limit

    def _client(self, rid: str) -> str | None:
        bound = self._owner.get(rid)
        return bound[0] if bound is not None else None

    def refusal(self, client: str, method: str, path: str,
                data: dict[str, Any] | None) -> str | None:
        """Why `client` may not make this request (a message for a 404), or None."""
        if path == PATH:
            previous = data.get("previous_response_id") if data is not None else None
            if isinstance(previous, str) and self._client(previous) != client:
                return _not_found(previous)
            # A new id of the client's choosing is fine; another client's is not.
            chosen = data.get("request_id") if data is not None else None
            if isinstance(chosen, str) and self._client(chosen) not in (None, client):
                return _not_found(chosen)
            return None
        match = _BY_ID.fullmatch(path)
        if match is None or (method == "POST") != (match.group(2) is not None):
            return f"Unknown route {path}"
        rid = match.group(1)
        if self._client(rid) != client:
            return _not_found(rid)
        return None

    def model_of(self, path: str) -> str | None:
        """The model whose server made the response a `/v1/responses/{id}[/cancel]` path
        names (None: not bound, or bound without a model)."""
        match = _BY_ID.fullmatch(path)
        bound = self._owner.get(match.group(1)) if match is not None else None
        return bound[1] if bound is not None else None

    def bind(self, client: str, response_id: str | None, model: str | None = None) -> None:
        """Remember that `response_id` was created for `client` by `model`'s server."""
        if not response_id or response_id in self._owner:
            return
        self._owner[response_id] = (client, model)
        while len(self._owner) > self._limit:
            self._owner.popitem(last=False)

    def bind_from_json(self, client: str, payload: bytes, model: str | None = None) -> None:
        """Bind the id of a non-streamed Responses answer (`{"id": "resp_...", "object":
        "response", ...}`)."""
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, dict) and doc.get("object") == "response" and \
                isinstance(doc.get("id"), str):
            self.bind(client, doc["id"], model)


def _not_found(rid: str) -> str:
    return f"Response with id '{rid}' not found. {NOT_KEPT}"


def created_id(event: bytes) -> str | None:
    """The response id announced by a stream's `response.created` event, else None."""
    if not event.startswith(b"event: response.created\n"):
        return None
    at = event.find(b"\ndata: ")
    try:
        doc = orjson.loads(event[at + 7:]) if at >= 0 else None
    except orjson.JSONDecodeError:
        return None
    response = doc.get("response") if isinstance(doc, dict) else None
    rid = response.get("id") if isinstance(response, dict) else None
    return rid if isinstance(rid, str) else None
