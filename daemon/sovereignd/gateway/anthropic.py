"""What differs for clients of Anthropic's Messages API (and the shapes it shares with OpenAI's
Responses API): where the key comes from, how usage is counted, how errors look.

Facts used here, from Anthropic's API reference (docs.anthropic.com/en/api/messages,
/en/api/errors, /en/api/messages-streaming) and vLLM 0.32's implementation
(vllm/entrypoints/anthropic/serving.py):
- clients send their key as `x-api-key: KEY` (the SDKs' default), not `Authorization: Bearer`;
- usage is `{"input_tokens", "output_tokens", "cache_read_input_tokens",
  "cache_creation_input_tokens"}`, where the prompt is the sum of the three input counts; a
  stream announces it in `message_start` (`message.usage`, input) and `message_delta` (`usage`,
  output, cumulative); OpenAI's Responses API uses `input_tokens`/`output_tokens` too, under
  `response.usage` in its `response.completed` event;
- errors are `{"type": "error", "error": {"type": T, "message": M}}` with T one of
  invalid_request_error (400), authentication_error (401), permission_error (403),
  not_found_error (404), request_too_large (413), rate_limit_error (429), api_error (500),
  overloaded_error (529), timeout_error (504).
"""

from __future__ import annotations

from typing import Any

import orjson

MESSAGES_PREFIX = "/v1/messages"

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                408: "timeout_error", 413: "request_too_large", 417: "invalid_request_error",
                429: "rate_limit_error", 504: "timeout_error"}


def is_messages(path: str) -> bool:
    """True for the Messages API's paths (`/v1/messages`, `/v1/messages/count_tokens`)."""
    return path == MESSAGES_PREFIX or path.startswith(MESSAGES_PREFIX + "/")


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The client key a request presents: `Authorization: Bearer KEY` (OpenAI's SDKs) or else
    `x-api-key: KEY` (Anthropic's). None if neither is sent; "" for another scheme (refused as
    malformed, never passed on)."""
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return ""
        return token.strip()
    if x_api_key is not None:
        return x_api_key.strip()
    return None


def error_body(status: int, message: str) -> bytes:
    """Anthropic's error object for an answer with HTTP `status` (the SDKs read
    `error.type` and `error.message`)."""
    type_ = _ERROR_TYPES.get(status, "api_error" if status < 503 or status > 529
                             else "overloaded_error")
    return orjson.dumps({"type": "error", "error": {"type": type_, "message": message}})


def usage_of(data: dict[str, Any]) -> dict[str, Any] | None:
    """The usage object of a JSON answer or stream event of any of the three APIs: top-level
    `usage` (OpenAI chat/completions, Anthropic messages and `message_delta`), under `message`
    (Anthropic `message_start`) or under `response` (Responses API)."""
    usage = data.get("usage")
    if isinstance(usage, dict):
        return usage
    for outer in ("message", "response"):
        inner = data.get(outer)
        if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
            found: dict[str, Any] = inner["usage"]
            return found
    return None


def token_counts(usage: dict[str, Any]) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens) of a usage object in OpenAI's names
    (`prompt_tokens`/`completion_tokens`) or Anthropic's and the Responses API's
    (`input_tokens` + cache reads + cache creation, `output_tokens`)."""
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    prompt = _int(usage.get("input_tokens"))
    if prompt is not None:
        for extra in ("cache_read_input_tokens", "cache_creation_input_tokens"):
            prompt += _int(usage.get(extra)) or 0
    return prompt, _int(usage.get("output_tokens"))


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
