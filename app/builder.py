"""Builds the Serve application from the config: one engine deployment per model, one ingress.

`serve_configs/*.yaml` name `app.builder:build_app` as their `import_path`; Ray Serve calls it with
the file's `args:`. Every check that can fail (config, backend, layout) runs here, before any replica.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from app.autoscaling import POLICY_PATH
from app.backend import BackendChoice, ClusterFacts, choose_backend, installed_vllm_build
from app.config import AppConfig, DeploymentOptions, EngineScalingTargets, ModelDeploymentOptions, ModelSpec
from app.cpu import CPUEngineServer, cpu_engine
from app.engine import EngineServer
from app.engine_arg_names import known_engine_arg_names
from app.ingress import ingress_class
from app.model_shape import read_model_shape
from app.process_guard import ACTIVATE_ENV as PROCESS_GUARD_ENV_NAME
from app.worker_fork import ACTIVATE_ENV as WORKER_FORK_ENV_NAME

logger = logging.getLogger("ray.serve")

ENGINE_REPLICA_ENV = {PROCESS_GUARD_ENV_NAME: "1", WORKER_FORK_ENV_NAME: "1",
                      "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
LORA_UPDATES_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
REPLICA_ROUTER = "app.replica_router:EngineReplicaRouter"


class ConfigError(ValueError):
    """An app config that cannot be served; raised at build time with the field and the fix."""


def load_config(args: dict[str, Any]) -> AppConfig:
    try:
        return AppConfig.model_validate(args)
    except ValidationError as e:
        problems = "\n".join(
            f"  - {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid app config (the `args:` of the Serve config file):\n{problems}") from None


def deployment_name(model_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", model_name)


def serve_options(options: DeploymentOptions) -> dict[str, Any]:
    """Ray Serve deployment options, except ray_actor_options (which depend on the backend) and the app's own."""
    chosen = options.model_dump(exclude={"num_cpus", "resources", "request_router", "scale_on_engine"},
                                exclude_none=True)
    if options.autoscaling_config is not None:
        chosen["num_replicas"] = "auto"
    return chosen


def engine_serve_options(options: ModelDeploymentOptions) -> dict[str, Any]:
    """An engine deployment's Serve options: its replicas are announced to the routers by Serve's controller
    (`app.replica_directory`), and its autoscaling runs on the load the engines report (`app.autoscaling`)."""
    chosen = serve_options(options)
    chosen["request_router_config"] = {"request_router_class": REPLICA_ROUTER}
    if options.autoscaling_config is not None:
        targets = options.scale_on_engine or EngineScalingTargets()
        chosen["autoscaling_config"] = {**options.autoscaling_config, "policy": {
            "policy_function": POLICY_PATH,
            "policy_kwargs": {"target_waiting_requests": targets.waiting_requests,
                              "target_kv_cache_usage": targets.kv_cache_usage},
        }}
    return chosen


def gpu_engine(spec: ModelSpec, wait_for_gpus_s: float = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine overrides, deployment options) for a model on GPUs, laid out over the live topology."""
    from app.layout import LayoutError, plan_layout, topology_from_ray

    deadline = time.monotonic() + wait_for_gpus_s
    while True:
        try:
            layout = plan_layout(topology_from_ray(spec.accelerator), spec.layout_request())
            break
        except LayoutError as e:
            if time.monotonic() >= deadline:
                raise ConfigError(f"model {spec.name!r}: {e}") from None
            logger.info("model %s: waiting for GPU nodes to join (%s)", spec.name, e)
            time.sleep(5)
    shape = read_model_shape(spec.resolved_source())
    problem = shape and shape.problem(layout.tensor_parallel_size, layout.pipeline_parallel_size)
    if problem:
        raise ConfigError(f"model {spec.name!r}: {problem}")
    logger.info("model %s: layout TP=%d x PP=%d (%s)", spec.name, layout.tensor_parallel_size,
                layout.pipeline_parallel_size, layout.reason)
    overrides = {
        **spec.engine_args,
        "tensor_parallel_size": layout.tensor_parallel_size,
        "pipeline_parallel_size": layout.pipeline_parallel_size,
    }
    actor: dict[str, Any] = {
        "num_cpus": spec.deployment.num_cpus,
        "resources": dict(spec.deployment.resources),
        "runtime_env": {"env_vars": dict(spec.env)},
    }
    if layout.world_size == 1:
        if spec.accelerator == "GPU":
            actor["num_gpus"] = 1
        else:
            actor["resources"][spec.accelerator] = 1
        return overrides, {"ray_actor_options": actor}
    # Workers are vLLM's Ray actors inside this replica's placement group; the replica holds no GPU.
    overrides["distributed_executor_backend"] = "ray"
    actor["num_gpus"] = 0
    return overrides, {
        "ray_actor_options": actor,
        "placement_group_bundles": layout.bundles,
        "placement_group_strategy": layout.strategy,
    }


def engine_deployment(spec: ModelSpec, choice: BackendChoice, facts: ClusterFacts, wait_for_gpus_s: float = 0):
    gpu = choice.backend == "gpu"
    overrides, options = gpu_engine(spec, wait_for_gpus_s) if gpu else cpu_engine(spec)
    if spec.task == "embed":
        overrides["runner"] = "pooling"
    if facts.vllm_build == ("cuda" if gpu else "cpu"):  # else the replica's image checks them itself
        check_engine_args(spec.name, overrides)
    server = EngineServer if gpu else CPUEngineServer
    options["ray_actor_options"]["runtime_env"]["env_vars"].update(ENGINE_REPLICA_ENV)
    if spec.lora_enabled:  # and vLLM's load/unload routes, which the router calls on every replica
        overrides["enable_lora"] = True
        options["ray_actor_options"]["runtime_env"]["env_vars"][LORA_UPDATES_ENV] = "True"
    deployment = serve.deployment(server, name=deployment_name(spec.name), **engine_serve_options(spec.deployment))
    # Only what the engine needs: Serve options (replicas, autoscaling) and routing settings may change without
    # replacing a replica (and reloading its model).
    engine_spec = spec.model_dump(mode="json", exclude={"deployment", "fallback", "fallback_after"})
    return deployment.options(**options).bind(engine_spec, overrides)


def check_engine_args(model: str, overrides: dict[str, Any]) -> None:
    unknown = sorted(set(overrides) - known_engine_arg_names())
    if unknown:
        raise ConfigError(
            f"model {model!r}: unknown vLLM engine argument(s) {unknown} in engine_args; "
            "use the names of `vllm serve --help` with underscores (e.g. max_model_len)"
        )


def cluster_facts(wait_for_gpus_s: float = 0, accelerator: str = "GPU") -> ClusterFacts:
    """What the cluster offers; waits up to `wait_for_gpus_s` for nodes with `accelerator` to join."""
    import ray

    deadline = time.monotonic() + wait_for_gpus_s
    devices = ray.cluster_resources().get(accelerator, 0.0) if ray.is_initialized() else 0.0
    while devices < 1 and time.monotonic() < deadline:
        logger.info("waiting for %s nodes to join the cluster (%.0fs left)", accelerator, deadline - time.monotonic())
        time.sleep(5)
        devices = ray.cluster_resources().get(accelerator, 0.0)
    return ClusterFacts(gpus=devices, vllm_build=installed_vllm_build())


def build_app(args: dict[str, Any]) -> Application:
    config = load_config(args)
    awaited = {m.accelerator for m in config.models if m.backend == "gpu"}  # wait only for devices a model needs
    facts = {a: cluster_facts(config.wait_for_gpus_s if a in awaited else 0, a)
             for a in {m.accelerator for m in config.models}}
    if not direct_ingress_enabled():
        logger.warning("RAY_SERVE_ENABLE_HA_PROXY=1 was not set where Ray started: requests reach the router through "
                       "Ray Serve's Python proxy (one Ray message per response chunk) instead of HAProxy")
    engines, backends = {}, {}
    for spec in config.models:
        choice = choose_backend(spec, facts[spec.accelerator])
        logger.info("model %s: %s backend (%s)", spec.name, choice.backend, choice.reason)
        engines[spec.name] = engine_deployment(spec, choice, facts[spec.accelerator], config.wait_for_gpus_s)
        backends[spec.name] = choice.backend
    ingress_options = serve_options(config.ingress) | {"ray_actor_options": {
        "num_cpus": config.ingress.num_cpus,
        "resources": dict(config.ingress.resources),
        # The router's uvicorn and its relays share one event loop: no thread hop per response chunk.
        "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}},
    }}
    # The engines are bound too, so that Serve deploys them; the router reaches them over HTTP, by deployment name.
    router = serve.deployment(ingress_class(), name="ingress", **ingress_options)
    names = {name: deployment_name(name) for name in engines}
    return router.bind(config, names, backends, engines)


def direct_ingress_enabled() -> bool:
    import os

    return "1" in (os.environ.get("RAY_SERVE_ENABLE_HA_PROXY"), os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS"))
