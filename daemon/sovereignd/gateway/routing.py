"""Routing by `model`: which model's server a request goes to, and the model list.

The request's JSON `model` names the model (OpenAI's API: every inference request carries
it); an unknown name is 404 in OpenAI's error shape (`model_not_found`, as api.openai.com
answers), a request without one is 400 when several models are served. `GET /v1/models`
lists every served model (OpenAI's list object) when there are several; with one model the
server's own list is passed through as before.
"""

from __future__ import annotations

import time
from typing import Any

from sovereignd.gateway.metrics import Metrics
from sovereignd.supervision.models import Model, Models, NotServed

__all__ = ["NotServed", "Router"]


class Router:
    """Looks models up for the proxy and starts on_demand ones."""

    def __init__(self, models: Models) -> None:
        self.models = models
        self._created = int(time.time())

    @property
    def lists_models(self) -> bool:
        """True when the gateway answers GET /v1/models itself (several models)."""
        return self.models.several

    async def acquire(self, name: str | None) -> Model:
        """The model to serve a request (NotServed when none can); release() when done."""
        return await self.models.acquire(name)

    def release(self, model: Model) -> None:
        self.models.release(model)

    def metrics_of(self, model: Model, shared: Metrics) -> Metrics | None:
        """The model's own metrics where they are not the gateway's (several models): the
        stall watch of that model reads its in-flight count and progress there."""
        return model.metrics if model.metrics is not shared else None

    def model_list(self, allowed: frozenset[str] | None = None) -> dict[str, Any]:
        """OpenAI's `GET /v1/models` answer: every served model (or those in `allowed`)."""
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self._created, "owned_by": "sovereignd",
             "root": name, "parent": None}
            for name in self.models.models if allowed is None or name in allowed]}
