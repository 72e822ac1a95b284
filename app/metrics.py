"""Prometheus metrics: the ingress's own series plus every engine replica's vLLM series, in one exposition."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class IngressMetrics:
    """What clients see: requests by route, model and status, and latency to first byte and to the end."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["route", "model", "status"]
        self.requests = Counter(
            "llm_ingress_requests", "Requests answered by the ingress.", labels, registry=self.registry
        )
        self.spillover = Counter(
            "llm_ingress_spillover_requests",
            "Requests sent to a fallback model because their model was busy.",
            ["model", "fallback"],
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "llm_ingress_time_to_first_byte_seconds",
            "Time from request arrival to the first response byte (TTFT for streams).",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "llm_ingress_request_duration_seconds",
            "Time from request arrival to the last response byte.",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


def engine_families(text: str, replica: str, prefix: str = "vllm:"):
    """The `vllm:*` families of one replica's exposition, each sample labelled with the replica id."""
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(prefix):
            continue
        family.samples = [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
        yield family


class _StaticCollector(Collector):
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def merged_exposition(ingress_text: str, engine_texts: dict[str, str]) -> str:
    """One valid exposition: families of several replicas merged so each name has one HELP/TYPE block."""
    merged: dict[str, object] = {}
    for replica, text in engine_texts.items():
        for family in engine_families(text, replica):
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = family
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StaticCollector(list(merged.values())))
    return ingress_text + generate_latest(registry).decode()
