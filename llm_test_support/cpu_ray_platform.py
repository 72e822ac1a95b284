"""A vLLM platform plugin that runs CPU workers under vLLM's Ray executor, for testing multi-node layouts.

vLLM's CPU platform has no `ray_device_key`, so its Ray executor refuses to start ("current platform cpu
does not support ray"). This plugin is vLLM's CPU platform plus what the Ray executor needs: a Ray custom
resource that stands for one device (`cpu_device`; give each node `resources={"cpu_device": N}`), so that
one engine with TP x PP workers spreads over several (possibly virtual) Ray nodes with gloo between them,
exactly like the GPU path does with `{"GPU": 1}` bundles.

It is a test device, not a way to serve: it activates only where `LLM_APP_CPU_RAY_PLATFORM=1`, through
the entry point group `vllm.platform_plugins` (see pyproject.toml). vLLM skips platform plugins entirely
when `VLLM_TARGET_DEVICE=cpu` is set, so leave that unset.

Why each piece (vLLM 0.32, `vllm/v1/executor/ray_executor.py` and `ray_utils.py`):
- `ray_device_key`: the executor picks the placement-group bundles that hold this key and starts one
  worker actor per bundle with `resources={key: 1}`. "CPU" cannot be used: Ray rejects `CPU` inside
  `resources=` (it must go through `num_cpus`), and the replica's own CPU would count as a device.
- `ray_noset_device_env_vars`: the executor sets these to "1" in every worker actor's runtime_env; listing
  our activation variable there makes the plugin activate in worker processes on every node, whatever
  the environment of those nodes' raylets.
- Executor swap: the stock worker wrapper asks Ray for the actor's accelerator ids under the device key
  (`get_accelerator_ids()[key]`), which Ray only reports for its built-in accelerators (GPU, TPU, ...):
  a custom resource raises KeyError. `CpuRayExecutor` is the stock executor with a worker wrapper that
  reports no device ids (CPU workers never index devices by id).
"""

from __future__ import annotations

import os

ACTIVATE_ENV = "LLM_APP_CPU_RAY_PLATFORM"
DEVICE_KEY = "cpu_device"


def is_enabled() -> bool:
    return os.environ.get(ACTIVATE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def register() -> str | None:
    """The `vllm.platform_plugins` entry point: our platform's qualified name when enabled, else None.

    vLLM calls this in every process that resolves its platform, so it imports nothing heavy."""
    return f"{__name__}.CpuRayPlatform" if is_enabled() else None


# The classes below are built on first lookup (module `__getattr__`), for two reasons: vLLM loads this
# module in every process, enabled or not, and on every image (the CUDA image too); and vLLM's Ray
# executor module imports `current_platform`, which cannot be imported while vLLM is still resolving the
# platform (which is when vLLM imports this module). Pickle finds them by name in other processes.


def _platform_class() -> type:
    from vllm.platforms.cpu import CpuPlatform

    class CpuRayPlatform(CpuPlatform):
        ray_device_key: str = DEVICE_KEY
        ray_noset_device_env_vars: list[str] = [ACTIVATE_ENV]

        @classmethod
        def check_and_update_config(cls, vllm_config) -> None:
            from vllm.config import CompilationMode  # not at class creation: vllm.config is importing us

            super().check_and_update_config(vllm_config)
            parallel = vllm_config.parallel_config
            if parallel.pipeline_parallel_size > 1 and vllm_config.compilation_config.mode == CompilationMode.NONE:
                # vLLM 0.32's CPU runner makes a later stage's receive buffers only in the compile warm-up;
                # without it the first request fails deep in the worker (an assert on intermediate_tensors).
                raise ValueError("pipeline_parallel_size > 1 on the CPU test platform needs torch.compile: "
                                 "drop enforce_eager (and compilation mode 0) from engine_args")
            if parallel.distributed_executor_backend == "ray":
                # A class, not its name: ParallelConfig.use_ray holds only for "ray" or a class with uses_ray.
                parallel.distributed_executor_backend = __getattr__("CpuRayExecutor")

    return CpuRayPlatform


def _executor_classes() -> tuple[type, type]:
    import ray
    from vllm.v1.executor import ray_executor
    from vllm.v1.executor.ray_utils import RayWorkerWrapper

    class CpuRayWorkerWrapper(RayWorkerWrapper):
        def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
            return ray.get_runtime_context().get_node_id(), []

    class CpuRayExecutor(ray_executor.RayDistributedExecutor):
        def _init_workers_ray(self, placement_group, **ray_remote_kwargs):
            # The parent method starts workers from the module-global name `RayWorkerWrapper`.
            ray_executor.RayWorkerWrapper = CpuRayWorkerWrapper
            super()._init_workers_ray(placement_group, **ray_remote_kwargs)

    return CpuRayExecutor, CpuRayWorkerWrapper


_BUILDERS = {
    "CpuRayPlatform": lambda: (_platform_class(),),
    "CpuRayExecutor": _executor_classes,
    "CpuRayWorkerWrapper": _executor_classes,
}


def __getattr__(name: str):
    if name not in _BUILDERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for cls in _BUILDERS[name]():
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        globals()[cls.__name__] = cls
    return globals()[name]
