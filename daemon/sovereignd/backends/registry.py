"""The model servers the daemon can run, by the name server.backend gives them."""

from __future__ import annotations

from sovereignd.backends.base import Backend
from sovereignd.backends.vllm import VllmBackend
from sovereignd.backends.vllm_mlx import VllmMlxBackend
from sovereignd.config import Config

BACKENDS: dict[str, Backend] = {"vllm": VllmBackend(), "vllm-mlx": VllmMlxBackend()}


def for_config(cfg: Config) -> Backend:
    """The profile named by server.backend."""
    return BACKENDS[cfg.server.backend]
