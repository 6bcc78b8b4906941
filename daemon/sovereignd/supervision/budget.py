"""Memory as one budget across models.

Each model's need is the memory preflight's estimate for it (weights + KV cache + runtime
overhead: `backends.memory`). Before a model starts, the needs of every other started model
and its own are added up against the budget (`memory.budget`, else the memory of the NUMA
node vLLM's CPU build reads, or the cgroup limit). When they do not fit, idle `on_demand`
models are stopped, least recently used first (llama-swap's swap, Ollama's eviction);
when that is not enough, the start is refused with the numbers: never started into an
out-of-memory crash.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sovereignd.backends import memory
from sovereignd.config import Config
from sovereignd.supervision.models import Model, Models
from sovereignd.supervision.states import State
from sovereignd.supervision.supervisor import Blocked, Gate


def need_of(cfg: Config) -> int | None:
    """Bytes the server of a model's configuration view needs by the preflight's estimate;
    None if not estimated (a GPU build, check off, a shape it cannot read)."""
    verdict = memory.Preflight(cfg).evaluate()
    if verdict is None:
        return None
    n = verdict.numbers
    if "estimated_bytes" in n:  # vllm-mlx: weights + overhead
        return int(n["estimated_bytes"])
    if "requested_bytes" in n:
        return int(n["requested_bytes"])
    if "kv_cache_bytes" not in n:
        return None
    return int(n["kv_cache_bytes"]) + int(n.get("weights_bytes", 0)) \
        + int(n.get("overhead_bytes", 0))


def _limit(models: Models) -> tuple[int, str]:
    configured = models.cfg.memory.budget
    if configured is not None:
        return configured, "memory.budget"
    host = memory.read_host_memory()
    return host.total, host.source


async def make_room(models: Models, model: Model) -> tuple[str, dict[str, Any]] | None:
    """None when `model` fits beside the other started models (after stopping idle
    on_demand ones, least recently used first); else the refusal and its numbers."""
    if not models.cfg.memory.check or not models.several:
        return None
    need = await asyncio.to_thread(need_of, model.cfg)
    if need is None:
        return None
    limit, source = await asyncio.to_thread(_limit, models)
    while True:
        started = [m for m in models.models.values() if m is not model and m.task is not None]
        needs = {m.name: await asyncio.to_thread(need_of, m.cfg) for m in started}
        total = need + sum(v or 0 for v in needs.values())
        if total <= limit:
            return None
        # Stopping a model frees memory only where its need is known.
        idle = sorted((m for m in started if m.spec.start == "on_demand" and not m.in_flight
                       and needs.get(m.name)), key=lambda m: m.last_used)
        if not idle:
            break
        await models.stop_model(idle[0], f"memory budget: making room for {model.name}")
    numbers = {"need_bytes": need, "others_bytes": total - need, "budget_bytes": limit,
               "budget_source": source, "started": needs}
    return (f"memory budget: {model.name} needs {memory.size(need)}, the started models "
            f"({', '.join(needs) or 'none'}) {memory.size(total - need)}: "
            f"{memory.size(total)} > {memory.size(limit)} ({source})"), numbers


def gate_for(models: Callable[[], Models], model: Model) -> Gate:
    """A supervisor gate: FATAL with the numbers when the model does not fit the budget
    (`models`: the collection, looked up when the gate runs)."""

    async def check() -> Blocked | None:
        refused = await make_room(models(), model)
        if refused is None:
            return None
        sentence, numbers = refused
        return Blocked(State.FATAL, sentence, {
            "kind": "memory-budget", "mitigation": "stop a model, give memory.budget more, "
            "or make a model on_demand so that it is stopped when idle", **numbers})

    return check
