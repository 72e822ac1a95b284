"""Prometheus metrics: the ingress's own series plus every engine replica's vLLM series, in one exposition."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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
        self.tokens = Counter(
            "llm_ingress_tokens", "Tokens of answered requests, from their usage.", ["model", "kind"],
            registry=self.registry,
        )
        self.inter_chunk = Histogram(
            "llm_ingress_inter_token_latency_seconds",
            "Gap between stream chunks as the client sees them (a chunk holds the tokens of one engine step).",
            ["route", "model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.migrations = Counter(
            "llm_ingress_migrations",
            "Requests handed to another replica of their model after theirs failed mid-answer (app.migration).",
            ["model"], registry=self.registry,
        )
        self.refusals = Counter(
            "llm_ingress_engine_refusals",
            "Requests an engine replica refused before any engine work (app.admission): full (at its "
            "max_ongoing_requests), stopping or broken; the request then went to another replica or waited.",
            ["model", "reason"], registry=self.registry,
        )
        self.in_flight = Gauge(
            "llm_ingress_requests_in_flight", "Requests open at this ingress replica.", ["model"],
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


request_logger = logging.getLogger("ray.serve")
USAGE = re.compile(rb'"(prompt_tokens|completion_tokens)":\s*(\d+)')


@dataclass
class RequestRecord:
    """One request's account: metrics as it goes, and one structured log line when it ends."""

    metrics: IngressMetrics
    route: str
    request_id: str
    model: str = "unknown"
    backend: str = "-"
    status: int | None = None
    started: float = field(default_factory=time.perf_counter)
    first_byte_s: float | None = None
    last_chunk: float | None = None
    tail: bytes = b""  # the end of the body, where `usage` sits
    migrations: list[dict] = field(default_factory=list)  # {"from", "to", "tokens"} per hand-over
    _gaps: Any = None  # the inter-chunk histogram's child for this route and model, looked up once

    def first_byte(self) -> None:
        self.first_byte_s = time.perf_counter() - self.started
        self.metrics.first_byte.labels(self.route, self.model).observe(self.first_byte_s)

    def chunk(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.last_chunk is not None:
            if self._gaps is None:
                self._gaps = self.metrics.inter_chunk.labels(self.route, self.model)
            self._gaps.observe(now - self.last_chunk)
        self.last_chunk = now
        self.tail = (self.tail + data)[-2048:]

    def finish(self, status: int) -> None:
        latency = time.perf_counter() - self.started
        self.metrics.requests.labels(self.route, self.model, str(status)).inc()
        self.metrics.duration.labels(self.route, self.model).observe(latency)
        usage = {k.decode(): int(v) for k, v in USAGE.findall(self.tail)}
        for kind, count in usage.items():
            self.metrics.tokens.labels(self.model, kind.removesuffix("_tokens")).inc(count)
        request_logger.info(json.dumps({
            "event": "request", "request_id": self.request_id, "route": self.route, "model": self.model,
            "backend": self.backend, "status": status, **usage, "latency_ms": round(latency * 1000, 1),
            "ttfb_ms": None if self.first_byte_s is None else round(self.first_byte_s * 1000, 1),
            **({"migrations": self.migrations} if self.migrations else {}),
        }))


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
