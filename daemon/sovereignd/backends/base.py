"""Backend profiles: everything that differs between model servers, behind one interface.

A profile says how the argument vector is built, how the internal key reaches the server,
which path answers health, what the canary request is, which API routes the gateway may
pass, which start-up messages are fatal, and whether the server logs request content.
Each server's profile is its own module (`vllm`, `vllm_mlx`) and `registry.for_config` picks
one by server.backend: adding a server means adding a module, not editing the supervisor.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovereignd.backends import tasks
from sovereignd.config import Config
from sovereignd.process.failures import FailurePattern

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

REDACTED = "[REDACTED]"


@dataclass(frozen=True)
class Route:
    """An API route the gateway passes: exact path or prefix, and the methods allowed."""

    path: str
    methods: frozenset[str]
    prefix: bool = False

    def matches(self, method: str, path: str) -> bool:
        if method not in self.methods:
            return False
        return path.startswith(self.path) if self.prefix else path == self.path


def _route(path: str, *methods: str, prefix: bool = False) -> Route:
    return Route(path, frozenset(methods), prefix)


class Backend(abc.ABC):
    """A model server's profile. Subclasses set the attributes and build the argument vector
    and environment; the canary, the route check and the redaction are those of any
    OpenAI-compatible server."""

    name: str
    key_in_argv: bool       # the internal key is on the command line (visible in `ps`)
    logs_content: bool      # the server logs request content even without content_flags
    health_path = "/health"
    # A server-output line that carries request content (redacted per server.content_lines).
    content_line: re.Pattern[str] | None = None
    # Flags (canonical spelling) that make the server log request content.
    content_flags: tuple[str, ...] = ()
    # The OpenAI-compatible inference routes every profile passes; a profile may add more.
    routes: tuple[Route, ...] = (
        _route("/v1/chat/completions", "POST"),
        _route("/v1/completions", "POST"),
        _route("/v1/embeddings", "POST"),
        _route("/v1/models", "GET"),
        # Anthropic's Messages API (vLLM 0.32 serves both; vllm-mlx 0.6 too).
        _route("/v1/messages", "POST"),
        _route("/v1/messages/count_tokens", "POST"),
    )
    # (API path, the server's route that counts its prompt's tokens with the model's
    # tokenizer) pairs (gateway/tokencount.py); an API without one keeps the prompt cap's
    # estimate.
    count_routes: tuple[tuple[str, str], ...] = ()
    # Flags that change how much memory the server takes (read by the memory estimate).
    memory_flags: tuple[str, ...] = ()
    # Fatal start-up messages, first match wins (process.failures.classify_exit).
    patterns: tuple[FailurePattern, ...] = ()

    @abc.abstractmethod
    def argv(self, cfg: Config, key: str) -> list[str]:
        """The server's argument vector; the key is passed only where the server needs it."""

    @abc.abstractmethod
    def private_tmp(self, cfg: Config) -> Path | None:
        """The server's own temporary folder, or None for a backend without."""

    @abc.abstractmethod
    def env(self, cfg: Config, key: str) -> dict[str, str]:
        """Environment additions for the server process."""

    def canary(self, cfg: Config) -> tuple[str, dict[str, Any]]:
        """Path and JSON body of a one-token completion that proves the engine works: a chat
        completion (a chat model without a chat template answers 400 to every chat request,
        so it must not be READY), or a plain completion with server.completions_only; for a
        pooling model (`tasks`) a one-input embedding, or a classification."""
        task = tasks.task_of(cfg.server.model, cfg.server.args, self.name)
        if task == tasks.EMBED:
            return "/v1/embeddings", {"model": cfg.model_name, "input": "ping"}
        if task == tasks.CLASSIFY:
            return "/classify", {"model": cfg.model_name, "input": ["ping"]}
        if not cfg.server.completions_only:
            return "/v1/chat/completions", {
                "model": cfg.model_name, "messages": [{"role": "user", "content": "ping"}],
                "max_tokens": 1, "temperature": 0}
        return "/v1/completions", {"model": cfg.model_name, "prompt": "ping", "max_tokens": 1,
                                   "temperature": 0}

    def redact_argv(self, argv: list[str]) -> list[str]:
        """The argument vector with any secret replaced, for logs and /status."""
        out, hide = [], False
        for arg in argv:
            if hide:
                out.append(REDACTED)
                hide = False
            elif arg in ("--api-key", "--api_key"):
                out.append(arg)
                hide = True
            elif arg.startswith(("--api-key=", "--api_key=")):
                out.append(arg.split("=", 1)[0] + "=" + REDACTED)
            else:
                out.append(arg)
        return out

    def allowed(self, method: str, path: str) -> bool:
        return any(r.matches(method, path) for r in self.routes)
