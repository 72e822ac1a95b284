"""`app.autoscaling`: what engine replicas report to Ray Serve, and the policy Serve's controller runs on it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Gauge

from app.autoscaling import EngineLoadPolicy, engine_load


def ctx(replicas: int, metrics: dict[str, list[float]], target_ongoing=2.0, lo=1, hi=4):
    return SimpleNamespace(
        current_num_replicas=replicas, target_num_replicas=replicas,
        aggregated_metrics={name: {f"r{i}": v for i, v in enumerate(values)} for name, values in metrics.items()},
        config=SimpleNamespace(get_target_ongoing_requests=lambda: target_ongoing),
        capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi,
    )


def test_engine_load_reads_vllms_gauges_and_the_open_requests():
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    Gauge("vllm:num_requests_running", "", labels, registry=registry).labels("m", "0").set(3)
    Gauge("vllm:num_requests_waiting", "", labels, registry=registry).labels("m", "0").set(5)
    Gauge("vllm:kv_cache_usage_perc", "", labels, registry=registry).labels("m", "0").set(0.4)
    assert engine_load(7, registry) == {"ongoing_requests": 7.0, "running_requests": 3.0,
                                        "waiting_requests": 5.0, "kv_cache_usage": 0.4}


def test_ongoing_requests_scale_like_serves_own_policy():
    policy = EngineLoadPolicy()
    assert policy(ctx(1, {"ongoing_requests": [16]}))[0] == 4  # 16 open / target 2 = 8, capped at max 4
    assert policy(ctx(2, {"ongoing_requests": [2, 2]}))[0] == 2  # on target: stay
    assert policy(ctx(2, {"ongoing_requests": [0, 0]}))[0] == 1  # idle: down to min


@pytest.mark.parametrize("metrics,expected", [
    ({"ongoing_requests": [2], "waiting_requests": [8]}, 2),  # the queue asks for more than the open requests
    ({"ongoing_requests": [2], "waiting_requests": [0], "kv_cache_usage": [0.9]}, 2),  # KV cache nearly full
    ({"ongoing_requests": [1], "waiting_requests": [0], "kv_cache_usage": [0.1]}, 1),
])
def test_engine_signals_can_ask_for_more_replicas(metrics, expected):
    policy = EngineLoadPolicy(target_waiting_requests=4, target_kv_cache_usage=0.5)
    assert policy(ctx(1, metrics))[0] == expected


def test_no_reports_yet_keeps_the_count():
    assert EngineLoadPolicy()(ctx(2, {}))[0] == 2
