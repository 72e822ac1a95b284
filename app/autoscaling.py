"""Ray Serve autoscaling on the engine's real load.

Requests go from the router straight to each engine replica's own HTTP server, so Serve's built-in count of
ongoing requests (requests through its proxy or handles) is always 0 for engines. Instead every engine replica
reports its load with Serve's `record_autoscaling_stats` hook (`engine_load`), and the deployment's
`autoscaling_config.policy` is `EngineLoadPolicy`, which Serve's controller runs on those reports (averaged over
`look_back_period_s`). Serve still applies min/max replicas, the up/down delays and the scaling factors.

Each signal asks for a replica count: `replicas x observed mean / target`; the largest wins.
- ongoing_requests (always): the engine requests open per replica, against `target_ongoing_requests` (Serve's own
  meaning of that option);
- waiting_requests (optional target): requests in vLLM's waiting queue per replica;
- kv_cache_usage (optional target, 0..1): the share of the engine's KV cache in use.
"""

from __future__ import annotations

import math
from typing import Any

POLICY_PATH = "app.autoscaling:EngineLoadPolicy"
# vLLM's own gauges -> the names replicas report them under.
ENGINE_GAUGES = {
    "vllm:num_requests_running": "running_requests",
    "vllm:num_requests_waiting": "waiting_requests",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}


def engine_load(ongoing: int, registry=None) -> dict[str, float]:
    """What an engine replica reports to Serve: its open engine requests, plus vLLM's own running/waiting/KV gauges
    from this process's Prometheus registry (where vLLM's stat logger keeps them)."""
    if registry is None:
        from prometheus_client import REGISTRY as registry
    load = {"ongoing_requests": float(ongoing), **dict.fromkeys(ENGINE_GAUGES.values(), 0.0)}
    for family in registry.collect():
        name = ENGINE_GAUGES.get(family.name)
        if name is not None:
            values = [s.value for s in family.samples if s.name == family.name]
            load[name] = max(values, default=0.0) if name == "kv_cache_usage" else sum(values)
    return load


class EngineLoadPolicy:
    """Serve's class-callable autoscaling policy; `policy_kwargs` are the optional engine-signal targets."""

    def __init__(self, target_waiting_requests: float | None = None, target_kv_cache_usage: float | None = None):
        self.targets = {"waiting_requests": target_waiting_requests, "kv_cache_usage": target_kv_cache_usage}

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        replicas = ctx.current_num_replicas
        metrics = ctx.aggregated_metrics or {}
        targets = {"ongoing_requests": ctx.config.get_target_ongoing_requests(),
                   **{k: v for k, v in self.targets.items() if v is not None}}
        asked = [replicas * mean / target for name, target in targets.items()
                 if (mean := _mean(metrics.get(name))) is not None]
        if replicas == 0 or not asked:  # no reports yet: stay
            return ctx.target_num_replicas, {}
        desired = max(asked)
        bounded = min(max(desired, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
        return math.ceil(bounded) if bounded > replicas else bounded, {}


def _mean(per_replica: dict | None) -> float | None:
    return sum(per_replica.values()) / len(per_replica) if per_replica else None
