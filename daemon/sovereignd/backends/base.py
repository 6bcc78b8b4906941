"""What every model-server profile shares: the API routes the gateway passes, the offline
environment switches and the redaction marker. Each server's profile is its own module
(`vllm`, `vllm_mlx`); `registry.for_config` picks one by server.backend.
"""

from __future__ import annotations

from dataclasses import dataclass

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
