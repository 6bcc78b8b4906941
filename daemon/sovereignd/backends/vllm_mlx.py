"""The vllm-mlx profile: the other server for Apple Silicon."""

from __future__ import annotations

import re
from pathlib import Path

from sovereignd.backends.base import OFFLINE_ENV, Backend
from sovereignd.config import Config
from sovereignd.process.failures import COMMON_PATTERNS, METAL_OOM, pattern


class VllmMlxBackend(Backend):
    """vllm-mlx (`vllm-mlx serve MODEL ...`), the other server for Apple Silicon.

    Differences handled here: the model is positional; the key can only be given as
    `--api-key` (no environment variable), so it is visible in `ps` to local users for as
    long as the server runs -- `check` says so; it serves on TCP only, so the daemon checks
    before every connection that the port's listener is the server it started
    (`serversock`), and ops/ has per-account firewall rules (nftables `meta skuid`, pf
    `user`) that keep other local accounts off the port; it has no drain option; it logs a
    preview of every prompt at INFO, which `server.content_lines` redacts by default.
    """

    name = "vllm-mlx"
    key_in_argv = True
    logs_content = True
    # `[REQUEST] last user message preview: ...` (chat) and `prompt_preview=...` (completions).
    content_line = re.compile(r"(last user message preview:|prompt_preview=)\s*")
    content_flags = ()
    # Inference only. Not passed: /v1/responses and /v1/mcp/* (they can run MCP tools on the
    # server), /v1/cache* and /v1/status (administration), /v1/audio/* and /v1/rerank (not
    # what this deployment serves; their usage is not recorded), /docs and /openapi.json.
    routes = Backend.routes
    # Anthropic's count (vllm_mlx/server.py `count_anthropic_tokens`, vllm-mlx 0.6): the
    # model's tokenizer on the text, without the chat template. No /tokenize.
    count_routes: tuple[tuple[str, str], ...] = (
        ("/v1/messages", "/v1/messages/count_tokens"),)
    patterns = (
        pattern("model-missing",
                r"(Failed to download '.*' after \d+ attempts|Repo id must be in the form|"
                r"does not appear to have a file named config\.json)",
                "the model directory is missing or not a model",
                "set server.model to a local model directory readable by the service account"),
        pattern("unsupported-architecture", r"(Model type \S+ not supported|"
                                            r"No module named 'mlx_lm\.models\.)",
                "the model's architecture is not supported by mlx-lm",
                "serve a model whose architecture mlx-lm supports"),
        METAL_OOM,
        *COMMON_PATTERNS,
    )
    memory_flags = ("--cache-memory-mb", "--cache-memory-percent", "--max-kv-size",
                    "--gpu-memory-utilization")

    def argv(self, cfg: Config, key: str) -> list[str]:
        s = cfg.server
        # --offline and no download retries: a missing model fails in seconds, not after
        # three attempts with back-off against a hub this machine must not reach.
        return [*s.command, str(s.model), "--served-model-name", cfg.model_name,
                "--host", s.host, "--port", str(s.port), "--api-key", key, "--offline",
                "--download-retries", "0", *s.args]

    def private_tmp(self, cfg: Config) -> Path | None:
        return None  # one process: no IPC sockets or rendezvous files of its own

    def env(self, cfg: Config, key: str) -> dict[str, str]:
        env = dict(OFFLINE_ENV)
        env.update(cfg.server.env)
        return env
