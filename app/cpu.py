"""The CPU-actor deployment: lightweight models (embeddings, small chat) on vLLM's CPU build.

Replicas hold no GPU, reserve a configurable share of logical CPUs, and get the CPU engine's settings
(KV cache size, thread binding, batch limits) from the model's `cpu:` options through `runtime_env`.
They scale on their own (`deployment.num_replicas` / `autoscaling_config`) and can be pinned to
CPU-image nodes with a custom resource (`deployment.resources`).
"""

from __future__ import annotations

from typing import Any

from app.config import ModelSpec
from app.engine import EngineServer


class CPUEngineServer(EngineServer):
    backend = "cpu"

    @staticmethod
    def _visible_gpus(engine_overrides: dict[str, Any]) -> int | None:
        return None


def cpu_environment(spec: ModelSpec) -> dict[str, str]:
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(spec.cpu.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": spec.cpu.omp_threads_bind,
        # vLLM 0.32's CPU build with torch 2.13 cannot load its AOT compile cache ("'function' object has no
        # attribute 'finalize_loading'") and compiles again at every start; the plain compile cache loads (-5 s).
        "VLLM_USE_AOT_COMPILE": "0",
    }
    if spec.cpu.reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(spec.cpu.reserved_cpus)
    return env | spec.env


def cpu_engine(spec: ModelSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine overrides, deployment options) for a model on vLLM's CPU build."""
    overrides = dict(spec.engine_args)
    if spec.cpu.max_num_seqs is not None:
        overrides.setdefault("max_num_seqs", spec.cpu.max_num_seqs)
    actor = {
        "num_cpus": spec.deployment.num_cpus,
        "num_gpus": 0,
        "resources": dict(spec.deployment.resources),
        "runtime_env": {"env_vars": cpu_environment(spec)},
    }
    return overrides, {"ray_actor_options": actor}
