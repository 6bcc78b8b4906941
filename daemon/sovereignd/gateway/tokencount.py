"""Count a request's prompt tokens with the model server's own tokenizer, for the prompt cap
(gateway/promptcap.py) when the estimate is too close to the cap to decide.

Two counting routes exist. vLLM 0.32 serves `POST /tokenize`
(vllm/entrypoints/serve/tokenize/api_router.py and protocol.py): a chat body `{"model",
"messages", "add_generation_prompt" (default true), "continue_final_message",
"add_special_tokens" (default false), "chat_template", "chat_template_kwargs", "tools"}` is
rendered through the model's chat template as a chat completion would be; a completion body
`{"model", "prompt": str, "add_special_tokens" (default true)}` is tokenized as a
completion's prompt; either answers 200 `{"count": int, "max_model_len": int, "tokens": [...]}`.
Anthropic's `POST /v1/messages/count_tokens` takes `{"model", "messages", "system", "tools",
"tool_choice", "thinking"}` and answers `{"input_tokens": int}`: vLLM 0.32 renders it through
the chat template (vllm/entrypoints/anthropic/api_router.py); vllm-mlx 0.6 encodes the text of
the system prompt, the messages and the tools one by one, without the template
(vllm_mlx/server.py `count_anthropic_tokens`), so its figure is a little low. vllm-mlx has no
/tokenize. Which backend counts which API is the backend's `count_routes`.

A count that fails in any way (an error status, a timeout, an answer without a count) raises
CountFailed: the caller falls back to the estimate, so a tokenizer problem never blocks a
request. One error is an answer: vLLM 0.32's Messages count_tokens refuses (400) a prompt
longer than the context, in the words of vllm/renderers/params.py ("This model's maximum
context length is N tokens. However, your prompt contains [at least ]T input tokens, ..." or,
before tokenizing, "... contains C characters (more than M characters, which is the upper
bound for K input tokens)"); that raises OverContext with the tokens it names (at least K + 1
in the second form), which the caller judges as a count.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson

from sovereignd.http.upstream import Target, UpstreamClient, UpstreamError

# A count is one tokenizer pass on the server's event loop: milliseconds. Longer means the
# server is busy or stuck, and the estimate will do.
TIMEOUT = 2.0
TOKENIZE = "/tokenize"
COUNT_TOKENS = "/v1/messages/count_tokens"
# The fields of each API that change the rendered prompt, as the counting request names them.
_CHAT_FIELDS = ("model", "messages", "tools", "add_generation_prompt", "continue_final_message",
                "add_special_tokens", "chat_template", "chat_template_kwargs")
_COMPLETION_FIELDS = ("model", "prompt", "add_special_tokens")
_MESSAGES_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking",
                    "chat_template_kwargs")
# Where each counting route puts the count in its answer.
_ANSWER_FIELD = {TOKENIZE: "count", COUNT_TOKENS: "input_tokens"}


class CountFailed(Exception):
    """The server did not count the prompt; the message says why (never the prompt)."""


class OverContext(Exception):
    """The server refused to count because the prompt alone exceeds its context: `tokens`
    is the count it names (a lower bound)."""

    def __init__(self, tokens: int) -> None:
        super().__init__(f"the prompt has at least {tokens} tokens")
        self.tokens = tokens


# vLLM's two over-context refusals (vllm/renderers/params.py), token and character forms.
_OVER_TOKENS = re.compile(r"maximum context length is \d+ tokens\. However, your prompt "
                          r"contains (?:at least )?(\d+) input tokens")
_OVER_CHARS = re.compile(r"maximum context length is \d+ tokens\. However, your prompt "
                         r"contains \d+ characters \(more than \d+ characters, which is the "
                         r"upper bound for (\d+) input tokens\)")


def over_context(payload: bytes) -> int | None:
    """The prompt tokens a vLLM over-context refusal names (at least), else None."""
    text = payload.decode("utf-8", "replace")
    if match := _OVER_TOKENS.search(text):
        return int(match.group(1))
    if match := _OVER_CHARS.search(text):
        return int(match.group(1)) + 1
    return None


def counting_body(route: str, path: str, data: dict[str, Any]) -> bytes | None:
    """The body for the counting `route` that renders the prompt of a request to `path` as
    the server will, or None for a request it cannot count (another API, a list of prompts,
    token ids)."""
    fields: tuple[str, ...]
    if route == TOKENIZE and path == "/v1/chat/completions" and \
            isinstance(data.get("messages"), list):
        fields = _CHAT_FIELDS
    elif route == TOKENIZE and path == "/v1/completions" and isinstance(data.get("prompt"), str):
        fields = _COMPLETION_FIELDS
    elif route == COUNT_TOKENS and path == "/v1/messages" and \
            isinstance(data.get("messages"), list):
        fields = _MESSAGES_FIELDS
    else:
        return None
    return orjson.dumps({k: data[k] for k in fields if data.get(k) is not None})


async def count(client: UpstreamClient, target: Target, key: str, route: str,
                body: bytes, *, timeout: float = TIMEOUT) -> int:
    """The prompt's token count as the server's tokenizer makes it. Raises CountFailed, or
    OverContext when the server says the prompt alone is longer than its context."""
    headers = [("Authorization", f"Bearer {key}"), ("Content-Type", "application/json")]
    try:
        async with asyncio.timeout(timeout):  # the answer's body too, not only its head
            up = await client.request(target, "POST", route, headers, body,
                                      timeout=timeout)
            try:
                payload = await up.read()
            finally:
                up.close()
    except (TimeoutError, UpstreamError) as exc:
        raise CountFailed(f"{type(exc).__name__}: {exc}" if str(exc)
                          else type(exc).__name__) from exc
    if up.status == 400 and (tokens := over_context(payload)) is not None:
        raise OverContext(tokens)
    if up.status != 200:
        raise CountFailed(f"the server answered {up.status}")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise CountFailed("the answer is not JSON") from exc
    tokens = doc.get(_ANSWER_FIELD.get(route, "count")) if isinstance(doc, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise CountFailed("the answer has no count")
    return tokens
