"""Unit tests for the ingress metrics and the merged Prometheus exposition (`app.metrics`)."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import LATENCY_BUCKETS, IngressMetrics, engine_families, merged_exposition


def engine_text(n: int, extra_family: str | None = None) -> str:
    """An exposition shaped like a vLLM replica's: vllm:* counter, gauge and histogram plus process series."""
    registry = CollectorRegistry()
    Counter("vllm:request_success", "Succeeded requests.", ["model_name", "finished_reason"], registry=registry).labels(
        "m", "stop"
    ).inc(n)
    Gauge("vllm:num_requests_running", "Running requests.", ["model_name"], registry=registry).labels("m").set(n)
    ttft = Histogram(
        "vllm:time_to_first_token_seconds", "TTFT.", ["model_name"], buckets=(0.1, 1.0), registry=registry
    )
    ttft.labels("m").observe(0.05 * n)
    Counter("python_gc_objects_collected", "GC objects.", registry=registry).inc()
    Gauge("process_resident_memory_bytes", "RSS.", registry=registry).set(1e6)
    if extra_family:
        Gauge(extra_family, "Only on this replica.", registry=registry).set(7)
    return generate_latest(registry).decode()


def help_and_type_lines(text: str) -> tuple[Tally, Tally]:
    helps = Tally(line.split()[2] for line in text.splitlines() if line.startswith("# HELP "))
    types = Tally(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE "))
    return helps, types


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def test_engine_families_keeps_vllm_and_labels_replica():
    families = list(engine_families(engine_text(1), "replica-1"))
    names = {f.name for f in families}
    assert "vllm:request_success" in names and "vllm:time_to_first_token_seconds" in names
    assert all(f.name.startswith("vllm:") for f in families)
    assert all(s.labels["replica"] == "replica-1" for f in families for s in f.samples)


def test_merged_exposition_one_block_per_family():
    ingress = IngressMetrics()
    ingress.requests.labels("/v1/chat/completions", "m", "200").inc()
    text = merged_exposition(ingress.exposition(), {"r1": engine_text(1), "r2": engine_text(2)})

    helps, types = help_and_type_lines(text)
    assert helps and all(count == 1 for count in helps.values()), helps
    assert all(count == 1 for count in types.values()), types
    assert helps["vllm:request_success_total"] == 1
    assert types["vllm:time_to_first_token_seconds"] == 1

    # Non-vllm families of the engines are dropped; the ingress's own series stay.
    assert "python_gc_objects_collected" not in text
    assert "process_resident_memory_bytes" not in text
    assert "llm_ingress_requests_total" in text


def test_merged_exposition_parses_back_with_both_replicas():
    text = merged_exposition(IngressMetrics().exposition(), {"r1": engine_text(1), "r2": engine_text(2)})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["vllm:request_success"].type == "counter"
    assert families["vllm:time_to_first_token_seconds"].type == "histogram"

    success = {
        s.labels["replica"]: s.value
        for s in families["vllm:request_success"].samples
        if s.name == "vllm:request_success_total"
    }
    assert success == {"r1": 1.0, "r2": 2.0}
    running = {s.labels["replica"]: s.value for s in families["vllm:num_requests_running"].samples}
    assert running == {"r1": 1.0, "r2": 2.0}
    ttft_sums = {
        s.labels["replica"]: s.value
        for s in families["vllm:time_to_first_token_seconds"].samples
        if s.name.endswith("_sum")
    }
    assert ttft_sums == {"r1": 0.05, "r2": 0.1}
    for family in families.values():
        if family.name.startswith("vllm:"):
            assert all(set(s.labels) >= {"replica", "model_name"} for s in family.samples)

    # No sample appears twice (same name and labels), which Prometheus would reject.
    keys = [(s.name, tuple(sorted(s.labels.items()))) for s in samples(text)]
    assert len(keys) == len(set(keys))


def test_merged_exposition_family_on_one_replica_only():
    text = merged_exposition("", {"r1": engine_text(1, "vllm:only_here"), "r2": engine_text(2)})
    only = [s for s in samples(text) if s.name == "vllm:only_here"]
    assert [(s.labels, s.value) for s in only] == [({"replica": "r1"}, 7.0)]


def test_merged_exposition_escapes_replica_label():
    replica = 'odd "replica" \\ id'
    text = merged_exposition("", {replica: engine_text(1)})
    assert {s.labels["replica"] for s in samples(text)} == {replica}


def test_merged_exposition_without_engines_is_the_ingress_text():
    ingress = IngressMetrics().exposition()
    assert merged_exposition(ingress, {}) == ingress
    assert merged_exposition(ingress, {"r1": ""}) == ingress


def test_ingress_metrics_series():
    metrics = IngressMetrics()
    metrics.requests.labels("/v1/chat/completions", "chat", "200").inc()
    metrics.requests.labels("/v1/chat/completions", "chat", "200").inc()
    metrics.requests.labels("/v1/embeddings", "unknown", "404").inc()
    metrics.first_byte.labels("/v1/chat/completions", "chat").observe(0.03)
    metrics.duration.labels("/v1/chat/completions", "chat").observe(1.5)

    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition())}
    requests = {
        (s.labels["route"], s.labels["model"], s.labels["status"]): s.value
        for s in families["llm_ingress_requests"].samples
        if s.name == "llm_ingress_requests_total"
    }
    assert requests == {("/v1/chat/completions", "chat", "200"): 2.0, ("/v1/embeddings", "unknown", "404"): 1.0}

    first_byte = families["llm_ingress_time_to_first_byte_seconds"]
    assert first_byte.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in first_byte.samples if s.name.endswith("_bucket")}
    assert buckets["0.025"] == 0.0 and buckets["0.05"] == 1.0 and buckets["+Inf"] == 1.0
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    duration = families["llm_ingress_request_duration_seconds"]
    assert [s.value for s in duration.samples if s.name.endswith("_sum")] == [1.5]


def test_ingress_metrics_instances_are_independent():
    a, b = IngressMetrics(), IngressMetrics()  # own registries: no "Duplicated timeseries" error
    a.requests.labels("/v1/completions", "m", "200").inc()
    assert 'status="200"' in a.exposition() and 'status="200"' not in b.exposition()
