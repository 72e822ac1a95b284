"""Renders a KubeRay `RayService` manifest from a Serve config file (serve_configs/*.yaml).

The config file becomes `serveConfigV2` verbatim; the Ray cluster around it is sized from the config:
- GPU worker pods get exactly the GPUs per node that the layout planner (`app.layout`) assumed, and enough
  pods to hold every GPU model's pipeline stages, so a placement group can never ask for more GPUs on a
  pod than the pod has (kuberay#2354, kserve#4226).
- CPU models (vLLM's CPU build) run on CPU-image worker pods; in a cluster with GPU pods too, they must be
  pinned there by a custom Ray resource that only the CPU group declares.
A config or a cluster shape that cannot work is an error that names the fix; nothing is written then.

    python scripts/render_rayservice.py serve_configs/gpu-single.yaml --gpu-workers 1 --gpus-per-worker 1 \\
        --cpu-workers 1 --out kuberay/gpu-single.yaml
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shlex
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `app` is this repository's package, whether or not it is installed

from app.config import AppConfig, DeploymentOptions, ModelSpec
from app.layout import Layout, LayoutError, Topology, plan_layout
from launch import RAY_SETTINGS

RAY_VERSION = "2.60.0"
IMPORT_PATH = "app.builder:build_app"
MAX_NAME_LENGTH = 47  # KubeRay derives Service and RayCluster names from it
NAME_PATTERN = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}
WORKER_PORTS = {"serve": 8000, "metrics": 8080}
HF_HOME = "/home/ray/.cache/huggingface"  # the Ray images run as user `ray`, whose home is /home/ray
PINNING_CAPACITY = 1000  # units of a pinning resource per pod: deployments ask for a sliver (0.01) each
UPGRADE_STRATEGIES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
REGENERATE_PREFIX = "#   "


class RenderError(ValueError):
    """A config or cluster shape that cannot be served; the message names the fix."""


@dataclass(frozen=True)
class PodSize:
    cpus: int
    memory_gib: int
    gpus: int = 0

    def quantities(self) -> dict[str, str]:
        # Strings: the CRD's int-or-string quantities reject floats, and KubeRay reads num-cpus/num-gpus here.
        sizes = {"cpu": str(self.cpus), "memory": f"{self.memory_gib}Gi"}
        return sizes | ({"nvidia.com/gpu": str(self.gpus)} if self.gpus else {})


HEAD_SIZE = PodSize(cpus=2, memory_gib=8)
CPU_WORKER_SIZE = PodSize(cpus=4, memory_gib=16)


def gpu_worker_size(gpus: int) -> PodSize:
    return PodSize(cpus=8 * gpus, memory_gib=48 * gpus, gpus=gpus)


@dataclass(frozen=True)
class GpuModel:
    spec: ModelSpec
    layout: Layout
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    image: str
    size: PodSize
    min_pods: int
    max_pods: int
    resources: dict[str, int]  # custom Ray resources the group's pods declare
    model_cache: bool


@dataclass(frozen=True)
class ClusterPlan:
    gpu_models: list[GpuModel]
    cpu_models: list[ModelSpec]
    groups: list[WorkerGroup]


# ---- reading the Serve config -------------------------------------------------------------------------------


def app_configs(serve_config_text: str) -> list[AppConfig]:
    """The validated `args` of every application of this app in a Serve config file."""
    document = yaml.safe_load(serve_config_text) or {}
    apps = [a for a in document.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    if not apps:
        raise RenderError(f"no application with import_path {IMPORT_PATH} in the Serve config")
    return [AppConfig.model_validate(app.get("args", {})) for app in apps]


def model_backend(spec: ModelSpec, cluster_has_gpus: bool) -> str:
    """Where a model runs, decided as app.backend.choose_backend does once the cluster is up."""
    if spec.backend != "auto":
        return spec.backend
    return "gpu" if cluster_has_gpus else "cpu"


def replica_bounds(spec: ModelSpec) -> tuple[int, int]:
    options = spec.deployment
    if options.autoscaling_config is None and isinstance(options.num_replicas, int):
        return options.num_replicas, options.num_replicas
    if options.autoscaling_config is None and options.num_replicas is None:
        return 1, 1
    autoscaling = options.autoscaling_config or {}
    if "max_replicas" not in autoscaling:
        raise RenderError(f"model {spec.name!r}: autoscaling needs autoscaling_config.max_replicas to size the "
                          "worker pods (Serve's own default, 100, is not a cluster size)")
    return int(autoscaling.get("min_replicas", 1)), int(autoscaling["max_replicas"])


def planned_gpu_model(spec: ModelSpec, topology: Topology) -> GpuModel:
    try:
        layout = plan_layout(topology, spec.layout_request())
    except LayoutError as error:
        raise RenderError(f"model {spec.name!r}: {error}; change --gpu-workers/--gpus-per-worker") from None
    return GpuModel(spec, layout, *replica_bounds(spec))


# ---- sizing the worker groups -------------------------------------------------------------------------------


def pods_to_hold(demands: list[float], capacity: float) -> int:
    """Pods of `capacity` that first-fit-decreasing packing needs for `demands` (each demand on one pod)."""
    free: list[float] = []
    for demand in sorted(demands, reverse=True):
        slot = next((i for i, room in enumerate(free) if room >= demand), None)
        if slot is None:
            free.append(capacity - demand)
        else:
            free[slot] -= demand
    return len(free)


def stage_gpus(models: list[GpuModel], at_most: bool) -> list[int]:
    """GPUs of every pipeline stage of every replica, at the fewest (but at least one) or the most replicas."""
    stages = []
    for model in models:
        replicas = model.max_replicas if at_most else max(1, model.min_replicas)
        stages += [model.layout.tensor_parallel_size] * (model.layout.pipeline_parallel_size * replicas)
    return stages


def gpu_group(models: list[GpuModel], args: argparse.Namespace, resources: dict[str, int]) -> WorkerGroup:
    per_pod = args.gpus_per_worker
    needed = sum(m.layout.world_size * m.max_replicas for m in models)
    most = pods_to_hold(stage_gpus(models, at_most=True), per_pod)
    if most > args.gpu_workers:
        raise RenderError(
            f"the GPU models need {needed} GPUs at their most replicas, in pipeline stages that fill {most} pods "
            f"of {per_pod} GPUs; --gpu-workers is {args.gpu_workers}: raise it to {most}")
    fewest = pods_to_hold(stage_gpus(models, at_most=False), per_pod)
    check_startup_layouts(models, Topology.uniform(fewest, per_pod))
    return WorkerGroup("gpu-workers", args.image, gpu_worker_size(per_pod), fewest, args.gpu_workers,
                       resources, model_cache=True)


def check_startup_layouts(models: list[GpuModel], startup: Topology) -> None:
    """The builder plans on the pods that are up when the app starts: they must give the same layouts."""
    for model in models:
        layout = planned_gpu_model(model.spec, startup).layout
        if (layout.tensor_parallel_size, layout.pipeline_parallel_size) != (
                model.layout.tensor_parallel_size, model.layout.pipeline_parallel_size):
            raise RenderError(f"model {model.spec.name!r}: the {len(startup.nodes)} GPU pods present at start "
                              f"give TP={layout.tensor_parallel_size} x PP={layout.pipeline_parallel_size}, the "
                              f"full group TP={model.layout.tensor_parallel_size} x "
                              f"PP={model.layout.pipeline_parallel_size}: set tensor_parallel_size and "
                              "pipeline_parallel_size in the config")


def cpu_demands(models: list[ModelSpec], ingress: list[DeploymentOptions], at_most: bool) -> list[float]:
    demands = []
    for spec in models:
        low, high = replica_bounds(spec)
        demands += [spec.deployment.num_cpus] * (high if at_most else max(1, low))
    return demands + [options.num_cpus for options in ingress]


def cpu_group(models: list[ModelSpec], ingress: list[DeploymentOptions], args: argparse.Namespace,
              resources: dict[str, int]) -> WorkerGroup:
    capacity = CPU_WORKER_SIZE.cpus
    too_big = sorted({s.name for s in models if s.deployment.num_cpus > capacity})
    if too_big:
        raise RenderError(f"models {too_big} ask for more than the {capacity} CPUs of a CPU worker pod")
    most = pods_to_hold(cpu_demands(models, ingress, at_most=True), capacity)
    if most > args.cpu_workers:
        raise RenderError(f"the CPU deployments need {most} pods of {capacity} CPUs at their most replicas; "
                          f"--cpu-workers is {args.cpu_workers}: raise it to {most}")
    fewest = max(1, pods_to_hold(cpu_demands(models, ingress, at_most=False), capacity))
    return WorkerGroup("cpu-workers", args.cpu_image, CPU_WORKER_SIZE, fewest, args.cpu_workers, resources,
                       model_cache=False)


def declared_resources(deployments: list[DeploymentOptions]) -> dict[str, int]:
    names = sorted({name for options in deployments for name in options.resources})
    return {name: PINNING_CAPACITY for name in names}


def check_pinning(cpu_models: list[ModelSpec], gpu_resources: dict[str, int], cpu_resources: dict[str, int]) -> None:
    """With both pod images in one cluster, every CPU model must be pinned to the CPU pods."""
    unpinned = [m.name for m in cpu_models if not set(m.deployment.resources) - set(gpu_resources)]
    if unpinned:
        raise RenderError(
            f"CPU models {unpinned} could be placed on GPU pods, whose image has no vLLM CPU build: give them "
            "deployment.resources {cpu_node: 0.01}, a custom resource that only the CPU worker group declares")
    shared = sorted(set(gpu_resources) & set(cpu_resources))
    if shared:
        raise RenderError(f"custom resources {shared} are asked for by both GPU and CPU models, so they cannot "
                          "pin either to its pods; use one resource per pod image")


def cluster_plan(configs: list[AppConfig], args: argparse.Namespace) -> ClusterPlan:
    has_gpus = args.gpu_workers > 0
    specs = [spec for config in configs for spec in config.models]
    gpu_specs = [s for s in specs if model_backend(s, has_gpus) == "gpu"]
    cpu_models = [s for s in specs if model_backend(s, has_gpus) == "cpu"]
    check_group_flags(gpu_specs, cpu_models, args)
    ingress = [config.ingress for config in configs]
    # The ingress runs anywhere; custom resources it asks for are declared by the CPU group if there is one.
    gpu_resources = declared_resources([s.deployment for s in gpu_specs] + ([] if cpu_models else ingress))
    cpu_resources = declared_resources([s.deployment for s in cpu_models] + (ingress if cpu_models else []))
    groups, gpu_models = [], []
    if gpu_specs:
        topology = Topology.uniform(args.gpu_workers, args.gpus_per_worker)
        gpu_models = [planned_gpu_model(spec, topology) for spec in gpu_specs]
        groups.append(gpu_group(gpu_models, args, gpu_resources))
    if cpu_models:
        if gpu_specs:
            check_pinning(cpu_models, gpu_resources, cpu_resources)
        groups.append(cpu_group(cpu_models, [] if gpu_specs else ingress, args, cpu_resources))
    return ClusterPlan(gpu_models, cpu_models, groups)


def check_group_flags(gpu_specs: list[ModelSpec], cpu_models: list[ModelSpec], args: argparse.Namespace) -> None:
    if gpu_specs and (args.gpu_workers < 1 or args.gpus_per_worker < 1):
        raise RenderError(f"models {[s.name for s in gpu_specs]} run on GPUs: give --gpu-workers N "
                          "--gpus-per-worker G")
    if not gpu_specs and args.gpu_workers:
        raise RenderError("no model of this config runs on GPUs: drop --gpu-workers")
    if cpu_models and args.cpu_workers < 1:
        raise RenderError(f"models {[s.name for s in cpu_models]} run on vLLM's CPU build, in CPU-image pods: "
                          "add --cpu-workers N")
    if not cpu_models and args.cpu_workers:
        raise RenderError("no model of this config runs on CPU: drop --cpu-workers")


# ---- the manifest -------------------------------------------------------------------------------------------


def ray_start_resources(resources: dict[str, int]) -> str:
    """KubeRay's format for custom resources in rayStartParams: JSON with escaped quotes, in quotes."""
    return '"' + json.dumps(resources).replace('"', '\\"') + '"'


def container(name: str, image: str, size: PodSize, ports: dict[str, int], model_cache: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        # Requests equal limits (Guaranteed QoS): Ray schedules on the limits KubeRay hands `ray start`.
        "resources": {"requests": size.quantities(), "limits": size.quantities()},
        "ports": [{"name": port_name, "containerPort": port} for port_name, port in ports.items()],
    }
    spec["env"] = serve_env() + (model_hub_env() if model_cache else [])
    if model_cache:
        spec["volumeMounts"] = [{"name": "model-cache", "mountPath": HF_HOME}]
    return spec


# `make serve`'s Ray and Serve settings (scripts/launch.py says why each) on every pod: the controller reads them on
# the head, replicas and raylets on the workers. Replicas listen on all interfaces so that HAProxy reaches those on
# other pods. The image sets HAProxy's binary itself (docker/Dockerfile).
SERVE_ENV = {**RAY_SETTINGS, "RAY_SERVE_DEFAULT_HTTP_HOST": "0.0.0.0"}


def serve_env() -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in SERVE_ENV.items()]


def model_hub_env() -> list[dict[str, Any]]:
    token = {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}
    return [{"name": "HF_HOME", "value": HF_HOME}, {"name": "HF_TOKEN", "valueFrom": token}]


def model_cache_volume(args: argparse.Namespace) -> dict[str, Any]:
    if args.model_cache_pvc:
        return {"name": "model-cache", "persistentVolumeClaim": {"claimName": args.model_cache_pvc}}
    return {"name": "model-cache", "emptyDir": {"sizeLimit": args.model_cache_size}}


def worker_pod_spec(group: WorkerGroup, args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [container("ray-worker", group.image, group.size, WORKER_PORTS, group.model_cache)]
    }
    if group.size.gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if group.model_cache:
        spec["securityContext"] = {"fsGroup": 100}  # the `users` group of the images' `ray` user: a PVC stays writable
        spec["volumes"] = [model_cache_volume(args)]
    return spec


def worker_group_spec(group: WorkerGroup, args: argparse.Namespace) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "groupName": group.name,
        "replicas": group.min_pods,
        "minReplicas": group.min_pods,
        "maxReplicas": group.max_pods,
    }
    if group.resources:
        spec["rayStartParams"] = {"resources": ray_start_resources(group.resources)}
    return spec | {"template": {"spec": worker_pod_spec(group, args)}}


def head_group_spec(image: str) -> dict[str, Any]:
    return {
        "rayStartParams": {"num-cpus": "0"},
        "template": {"spec": {"containers": [container("ray-head", image, HEAD_SIZE, HEAD_PORTS, False)]}},
    }


def upgrade_strategy(args: argparse.Namespace) -> dict[str, Any]:
    strategy: dict[str, Any] = {"type": args.upgrade_strategy}
    if args.upgrade_strategy == "NewClusterWithIncrementalUpgrade":
        if not args.gateway_class:
            raise RenderError("NewClusterWithIncrementalUpgrade routes traffic through the Gateway API: "
                              "give --gateway-class")
        strategy["clusterUpgradeOptions"] = {"gatewayClassName": args.gateway_class, "stepSizePercent": 25,
                                             "intervalSeconds": 60, "maxSurgePercent": 100}
    return strategy


def initializing_timeout(plan: ClusterPlan, args: argparse.Namespace) -> str:
    """How long a new cluster may take to serve: image pulls, model downloads and loads (longest multi-node)."""
    if args.initializing_timeout:
        return args.initializing_timeout
    if any(m.layout.pipeline_parallel_size > 1 for m in plan.gpu_models):
        return "60m"
    return "30m" if plan.gpu_models else "15m"


def rayservice(name: str, serve_config_text: str, plan: ClusterPlan, args: argparse.Namespace) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if args.namespace:
        metadata["namespace"] = args.namespace
    metadata["annotations"] = {"ray.io/initializing-timeout": initializing_timeout(plan, args)}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "upgradeStrategy": upgrade_strategy(args),
            "serveConfigV2": serve_config_text,
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600},
                "headGroupSpec": head_group_spec(args.cpu_image),
                "workerGroupSpecs": [worker_group_spec(group, args) for group in plan.groups],
            },
        },
    }


# ---- the comments at the top of the file --------------------------------------------------------------------


def count_text(fewest: int, most: int) -> str:
    return str(most) if fewest == most else f"{fewest} to {most}"


def model_lines(plan: ClusterPlan) -> list[str]:
    lines = []
    for model in plan.gpu_models:
        layout = model.layout
        replicas = count_text(model.min_replicas, model.max_replicas)
        lines.append(f"{model.spec.name}: GPUs, TP={layout.tensor_parallel_size} x PP={layout.pipeline_parallel_size}"
                     f" on {len(set(layout.nodes))} pod(s) per replica, {replicas} replica(s) ({layout.reason}).")
    lines += [f"{spec.name}: vLLM's CPU build on the cpu-workers pods." for spec in plan.cpu_models]
    return lines


def group_lines(plan: ClusterPlan) -> list[str]:
    lines = []
    for group in plan.groups:
        pods = f"{count_text(group.min_pods, group.max_pods)} pod(s)"
        if group.min_pods < group.max_pods:
            pods += " (the autoscaler adds pods for Serve replicas that wait)"
        gpus = f"nvidia.com/gpu {group.size.gpus} (the GPUs per node the planner assumed), " if group.size.gpus else ""
        pinned = f"; declares Ray resources {json.dumps(group.resources)}" if group.resources else ""
        lines.append(f"{group.name}: {pods}, {gpus}{group.size.cpus} CPUs, {group.size.memory_gib}Gi, "
                     f"image {group.image}{pinned}.")
    return lines


def operations_lines(plan: ClusterPlan, args: argparse.Namespace) -> list[str]:
    lines = [
        "Head: num-cpus 0 keeps Serve replicas off it; it runs Ray's control plane, the Serve controller and a proxy.",
        "Request path: RAY_SERVE_ENABLE_HA_PROXY=1 on every pod: HAProxy on :8000 (it answers /-/healthz) passes",
        "  connections to the router replicas' own HTTP servers, which relay bytes to the engine replicas' servers.",
        "Probes: none set on purpose. KubeRay injects Ray-aware ones: liveness checks only Ray's own processes,",
        "  so a long model load never restarts a pod; on RayService workers readiness also checks the Serve proxy",
        "  (:8000/-/healthz), so a pod without a Serve replica (e.g. a later pipeline stage's pod) stays 0/1 Ready,",
        "  which only keeps it out of the serve Service. Serve's own health checks replace broken replicas.",
        "/dev/shm: KubeRay mounts a memory-backed emptyDir there (sized to the memory limit) for Ray's object",
        "  store and NCCL; it is not declared here so that the two do not collide.",
        "ray.io/initializing-timeout: how long a new cluster may take to pull images and load models before",
        "  KubeRay gives up on it (serviceUnhealthySecondThreshold is ignored by current KubeRay, so none is set).",
    ]
    spans_pods = any(len(set(m.layout.nodes)) > 1 for m in plan.gpu_models)
    return lines + upgrade_lines(args) + (hub_lines(args) if plan.gpu_models else []) + (
        network_lines() if spans_pods else [])


def network_lines() -> list[str]:
    return ["Across pods: tensor parallelism stays inside a pod (NVLink); pipeline stages pass activations between",
            "  pods over the pod network with NCCL. With InfiniBand or RoCE, add the cluster's RDMA device resources",
            "  and NCCL settings to the GPU pods."]


def upgrade_lines(args: argparse.Namespace) -> list[str]:
    in_place = "An edit of serveConfigV2 alone is applied in place: Serve rolls the changed deployments."
    if args.upgrade_strategy == "None":
        return [f"Upgrades: None: edits of rayClusterConfig are not rolled out. {in_place}"]
    if args.upgrade_strategy == "NewClusterWithIncrementalUpgrade":
        return ["Upgrades: NewClusterWithIncrementalUpgrade: an edit of rayClusterConfig (image, pods) starts a new",
                "  cluster and shifts traffic to it in steps through the Gateway API while the old one scales down.",
                f"  {in_place}"]
    return ["Upgrades: NewCluster: an edit of rayClusterConfig (image, pods) starts a second cluster, moves traffic",
            "  once its Serve apps are healthy, then deletes the old one: zero downtime, but twice the pods (and",
            f"  GPUs) while it runs. {in_place}"]


def hub_lines(args: argparse.Namespace) -> list[str]:
    cache = (f"PersistentVolumeClaim {args.model_cache_pvc}" if args.model_cache_pvc
             else f"an emptyDir of up to {args.model_cache_size} per pod (downloads again when a pod restarts)")
    return ["Model hub: HF_TOKEN comes from the Secret hf-token (key token, optional: public models need none);",
            f"  downloads go to HF_HOME={HF_HOME}, {cache}."]


def header(name: str, args: argparse.Namespace, plan: ClusterPlan, command: str) -> str:
    intro = [f"RayService {name}: {repo_relative(args.serve_config)} on KubeRay. serveConfigV2 is that file verbatim.",
             "Rendered by scripts/render_rayservice.py: edit the Serve config or the flags, not this file",
             "(tests/test_kuberay.py checks that they agree). Regenerate with:"]
    notes = [""] + model_lines(plan) + group_lines(plan) + [""] + operations_lines(plan, args)
    return comment(intro) + f"{REGENERATE_PREFIX}{command}\n" + comment(notes)


def comment(lines: list[str]) -> str:
    """YAML comment lines, wrapped (a command line is never wrapped: tests read it back)."""
    wrapped = [part for line in lines
               for part in textwrap.wrap(line, 116, subsequent_indent="  ", break_on_hyphens=False,
                                         break_long_words=False) or [""]]
    return "".join(f"# {line}".rstrip() + "\n" for line in wrapped)


# ---- YAML and the command line ------------------------------------------------------------------------------


class ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, so the Serve config reads as it does in its file."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


ManifestDumper.add_representer(str, _represent_str)


def manifest_yaml(manifest: dict[str, Any]) -> str:
    return yaml.dump(manifest, Dumper=ManifestDumper, sort_keys=False, width=120, allow_unicode=True)


def default_name(serve_config: pathlib.Path) -> str:
    return "llm-" + re.sub(r"[^a-z0-9-]", "-", serve_config.stem.lower())


def checked_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_PATTERN.match(name):
        raise RenderError(f"name {name!r} must be at most {MAX_NAME_LENGTH} characters of a-z, 0-9 and '-', "
                          "starting with a letter (KubeRay derives Service names from it)")
    return name


def repo_relative(path: pathlib.Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def parser() -> argparse.ArgumentParser:
    version = project_version()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("serve_config", type=pathlib.Path, help="a Serve config file, e.g. serve_configs/mixed.yaml")
    p.add_argument("--name", help="RayService name (default: llm-<config file name>)")
    p.add_argument("--namespace", help="Kubernetes namespace (default: kubectl's current one)")
    p.add_argument("--image", default=f"llm-serve-app:{version}-gpu", help="image of the GPU worker pods")
    p.add_argument("--cpu-image", default=f"llm-serve-app:{version}-cpu", help="image of the head and CPU workers")
    p.add_argument("--gpu-workers", type=int, default=0, help="most GPU worker pods (the planner's node count)")
    p.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs of each GPU worker pod")
    p.add_argument("--cpu-workers", type=int, default=0, help="most CPU worker pods")
    p.add_argument("--upgrade-strategy", choices=UPGRADE_STRATEGIES, default="NewCluster")
    p.add_argument("--gateway-class", help="Gateway API class, for NewClusterWithIncrementalUpgrade")
    p.add_argument("--initializing-timeout", help="ray.io/initializing-timeout (default: from the layouts)")
    p.add_argument("--model-cache-pvc", help="PersistentVolumeClaim for the model cache (default: an emptyDir)")
    p.add_argument("--model-cache-size", default="200Gi", help="size limit of the emptyDir model cache")
    p.add_argument("--out", type=pathlib.Path, help="write here instead of stdout")
    return p


def command_line(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The canonical command that renders this manifest again (options that differ from their defaults)."""
    words = ["python", "scripts/render_rayservice.py", repo_relative(args.serve_config)]
    for action in p._actions:
        value = getattr(args, action.dest, None)
        if action.option_strings and action.dest not in ("help", "out") and value != action.default:
            words += [action.option_strings[0], str(value)]
    if args.out:
        words += ["--out", repo_relative(args.out)]
    return shlex.join(words)


def render(argv: list[str]) -> str:
    """The manifest file's text for a command line (without the program name)."""
    p = parser()
    return rendered_text(p, p.parse_args(argv))


def rendered_text(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    text = args.serve_config.read_text()
    plan = cluster_plan(app_configs(text), args)
    name = checked_name(args.name or default_name(args.serve_config))
    manifest = rayservice(name, text, plan, args)
    return header(name, args, plan, command_line(p, args)) + manifest_yaml(manifest)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        text = rendered_text(p, args)
    except (ValueError, OSError) as error:  # RenderError, LayoutError and pydantic's ValidationError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
