"""Prompt caps: refuse, before the server generates, a request whose prompt plus the tokens it
asks for cannot fit the model's context (or the operator's `gateway.max_prompt_tokens`).

Why at the gateway: vllm-mlx accepts a prompt far beyond the model's context and works on it
while every other client waits (vllm-mlx issue 795); vLLM refuses it itself, after tokenizing.
The gateway has no tokenizer of its own (it does not import the server's libraries). It first
estimates the prompt from its text: 4 bytes of UTF-8 per token, OpenAI's rule of thumb for
English ("one token is about 4 characters", help.openai.com "What are tokens and how to count
them"). Estimation errs both ways (random or non-Latin text takes one to two bytes per token),
so the estimate decides only where it cannot be wrong enough to matter: a prompt whose every
byte could be a token and still fit passes; one estimated at more than FAR_BEYOND times the
cap is refused without asking anyone. Between the two, `assess` says "count": the proxy asks
the model's own tokenizer (gateway/tokencount.py) and judges by the exact figure, or, if that
fails, by the estimate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sovereignd.backends import memory, modelfiles
from sovereignd.config import Config

BYTES_PER_TOKEN = 4
# A byte-level BPE tokenizer (GPT-2's, Llama 3's, Qwen's) or one with byte fallback
# (SentencePiece) spends at most one token per byte of text; a chat template adds some per
# message (role markers, headers).
TEMPLATE_TOKENS_PER_MESSAGE = 16
# Tool definitions reach the template as JSON (keys, quotes, braces: every byte counts, not
# only the strings), with the template's own preamble around them; what that preamble takes
# is the template's choice, so requests with tools are never "fits" by this allowance alone
# unless they fit with it too.
TOOLS_PREAMBLE_TOKENS = 256
# An estimate this many times the cap is refused without counting: it would take over
# 8 bytes per token to fit, which ordinary text does not reach, and a count of a huge prompt
# costs the server the tokenizing the cap exists to spare it.
FAR_BEYOND = 2
# The three outcomes of `assess`.
FITS, REFUSE, COUNT = "fits", "refuse", "count"
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


@dataclass(frozen=True)
class Assessment:
    """What the estimate alone says of a request: `verdict` is FITS, REFUSE or COUNT (too
    close to call: count exactly); `prompt` the estimated prompt tokens, `budget` the
    requested output tokens, `bound` the most tokens the prompt could take."""

    verdict: str
    prompt: int
    budget: int
    bound: int


def estimate(data: dict[str, Any]) -> tuple[int, int]:
    """(estimated prompt tokens, requested output tokens) of a request body."""
    return -(-_size(data) // BYTES_PER_TOKEN), _budget(data)


def assess(cap: Cap | None, data: dict[str, Any]) -> Assessment:
    """Judge a request body against `cap` by its size alone (see the module's docstring)."""
    size = _size(data)
    prompt, budget = -(-size // BYTES_PER_TOKEN), _budget(data)
    messages = data.get("messages")
    bound = size + TEMPLATE_TOKENS_PER_MESSAGE * (
        1 + (len(messages) if isinstance(messages, list) else 0))
    if data.get("tools"):  # (see TOOLS_PREAMBLE_TOKENS)
        bound += TOOLS_PREAMBLE_TOKENS
    if cap is None or bound + budget <= cap.tokens:
        verdict = FITS
    elif prompt + budget > FAR_BEYOND * cap.tokens:
        verdict = REFUSE
    else:
        verdict = COUNT
    return Assessment(verdict, prompt, budget, bound)


def refusal(cap: Cap | None, data: dict[str, Any]) -> str | None:
    """The refusal message for a request that the estimate alone says cannot fit `cap`, or
    None if it may go on (a request near the cap is judged by its estimate here; the proxy
    counts those exactly first, see `assess`)."""
    if cap is None:
        return None
    prompt, budget = estimate(data)
    return judged(cap, prompt, budget, None)


def judged(cap: Cap, prompt: int, budget: int, counted_by: str | None) -> str | None:
    """The refusal message if `prompt` + `budget` tokens exceed `cap`, else None.
    `counted_by` names the tokenizer that counted `prompt` exactly; None: it is an estimate."""
    if prompt + budget <= cap.tokens:
        return None
    how = (f"{prompt} tokens, counted by {counted_by}" if counted_by is not None
           else f"about {prompt} tokens, estimated from its size")
    return (f"the prompt ({how}) plus max_tokens ({budget}) exceeds this model's limit of "
            f"{cap.tokens} tokens ({cap.source}); shorten the prompt or lower max_tokens")


def _size(data: dict[str, Any]) -> int:
    """Bytes of prompt text; tool definitions as the JSON the template renders (keys,
    quotes and braces too, not only their strings)."""
    size = sum(_text_bytes(data.get(name)) for name in _PROMPT_FIELDS if name != "tools")
    tools = data.get("tools")
    if tools:
        size += len(json.dumps(tools, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return size


def _budget(data: dict[str, Any]) -> int:
    for name in _BUDGET_FIELDS:
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _text_bytes(value: object) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    return 0
