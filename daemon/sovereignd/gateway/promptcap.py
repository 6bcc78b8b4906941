"""Prompt caps: refuse, before the server sees it, a request whose prompt plus the tokens it asks
for cannot fit the model's context (or the operator's `gateway.max_prompt_tokens`).

Why at the gateway: vllm-mlx accepts a prompt far beyond the model's context and works on it
while every other client waits (vllm-mlx issue 795); vLLM refuses it itself, after tokenizing.
The gateway has no tokenizer (it does not import the server's libraries), so it estimates the
prompt from its text: 4 bytes of UTF-8 per token, OpenAI's rule of thumb for English ("one
token is about 4 characters", help.openai.com "What are tokens and how to count them").
Estimation errs both ways on real text, so a request near the limit passes to the server,
which counts exactly; one far beyond it never reaches the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sovereignd.backends import memory, modelfiles
from sovereignd.config import Config

BYTES_PER_TOKEN = 4
# Where the three APIs put prompt text: chat `messages`, completions `prompt`, Anthropic
# `system` + `messages`, Responses `instructions` + `input`; tool definitions count too.
_PROMPT_FIELDS = ("messages", "prompt", "system", "input", "instructions", "tools")
# The output budget's name in chat/completions, Anthropic (`max_tokens`), newer OpenAI
# chat (`max_completion_tokens`) and the Responses API (`max_output_tokens`).
_BUDGET_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@dataclass(frozen=True)
class Cap:
    """The largest prompt + output (tokens) a model takes, and where that number comes from."""

    tokens: int
    source: str


def cap_for(cfg: Config) -> Cap | None:
    """The cap of the configured model: the smallest of `gateway.max_prompt_tokens`, the
    server's `--max-model-len` and, without one, the model's length as vLLM derives it from
    its files (`modelfiles.context_length`); None when none of them is known."""
    caps = []
    if cfg.gateway.max_prompt_tokens:
        caps.append(Cap(cfg.gateway.max_prompt_tokens, "gateway.max_prompt_tokens"))
    try:
        max_len = memory.parse_server_args(cfg.server.args, cfg.server.env).max_model_len
    except ValueError:
        max_len = None
    if max_len:
        caps.append(Cap(max_len, "the server's --max-model-len"))
    else:
        derived = modelfiles.context_length(cfg.server.model)
        if derived is not None:
            caps.append(Cap(derived[0], f"the model's context length ({derived[1]})"))
    return min(caps, key=lambda c: c.tokens) if caps else None


def estimate(data: dict[str, Any]) -> tuple[int, int]:
    """(estimated prompt tokens, requested output tokens) of a request body."""
    size = sum(_text_bytes(data.get(name)) for name in _PROMPT_FIELDS)
    budget = 0
    for name in _BUDGET_FIELDS:
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            budget = value
            break
    return -(-size // BYTES_PER_TOKEN), budget


def refusal(cap: Cap | None, data: dict[str, Any]) -> str | None:
    """The refusal message for a request that cannot fit `cap`, or None if it may go on."""
    if cap is None:
        return None
    prompt, budget = estimate(data)
    if prompt + budget <= cap.tokens:
        return None
    return (f"the prompt (about {prompt} tokens, estimated from its size) plus max_tokens "
            f"({budget}) exceeds this model's limit of {cap.tokens} tokens ({cap.source}); "
            "shorten the prompt or lower max_tokens")


def _text_bytes(value: object) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    return 0
