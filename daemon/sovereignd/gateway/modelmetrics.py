"""Per-model supervisor metrics in the gateway's one registry, labelled `model`.

With several models each supervisor counts in a Metrics of its own (its states, restarts,
failures, probes, stalls); the gateway's registry then exports those families once, every
sample with a `model` label, in place of its own unlabelled ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from sovereignd.gateway.metrics import Metrics

# The supervisor's metrics (attribute names of Metrics).
SUPERVISOR_METRICS = ("state", "server_up", "restarts", "failures", "probe_latency",
                      "probe_failures", "orphans_killed", "shm_removed", "stalls", "at_server")


class _PerModel(Collector):
    def __init__(self, per_model: Mapping[str, Metrics]) -> None:
        self.per_model = per_model

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for name, metrics in self.per_model.items():
            for attr in SUPERVISOR_METRICS:
                for family in getattr(metrics, attr).collect():
                    out = merged.get(family.name)
                    if out is None:
                        out = merged[family.name] = Metric(family.name, family.documentation,
                                                           family.type, family.unit)
                    for sample in family.samples:
                        out.add_sample(sample.name, {"model": name, **sample.labels},
                                       sample.value, sample.timestamp, sample.exemplar)
        return list(merged.values())


def merge(shared: Metrics, per_model: Mapping[str, Metrics]) -> None:
    """Export every model's supervisor metrics through `shared`'s registry, labelled."""
    for attr in SUPERVISOR_METRICS:
        shared.registry.unregister(getattr(shared, attr))
    shared.registry.register(_PerModel(per_model))
