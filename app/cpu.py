"""The CPU-actor deployment: lightweight models (embeddings, small chat) on vLLM's CPU build.

Replicas hold no GPU, reserve a configurable share of logical CPUs, and get the CPU engine's settings
(KV cache size, batch limits) from the model's `cpu:` options through `runtime_env`. Each replica picks its
engine's cores when it starts (`engine_cores`): from the cores it really has (CPU affinity, capped by the cgroup CPU
quota), never from Ray's `num_cpus` (Ray sets OMP_NUM_THREADS=1 for a fractional `num_cpus`, and vLLM's own
auto-bind puts every engine of a node on the same cores, vLLM #43240). Engines of one node share a claim table (a
file under the node's temp folder, locked while read and written) so that each takes cores no other engine
computes on while there are any; with `engine_core: with_worker` the engine core computes on its worker's first
core (`app.engine_core_cpu`). Replicas scale on their own (`deployment.num_replicas` / `autoscaling_config`) and
can be pinned to CPU-image nodes with a custom resource (`deployment.resources`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import pathlib
import tempfile
from collections import Counter
from typing import Any

import psutil

from app.config import CPUOptions, ModelSpec
from app.engine import EngineServer
from app.engine_core_cpu import CORE_ENV
from app.shm_spin import SPIN_ENV

logger = logging.getLogger("ray.serve")

CLAIMS_FILE = pathlib.Path(tempfile.gettempdir()) / "llm-app-cpu-cores.json"  # pid -> cores, one per node
CGROUP_CPU_MAX = pathlib.Path("/sys/fs/cgroup/cpu.max")


class CPUEngineServer(EngineServer):
    backend = "cpu"

    @staticmethod
    def _visible_gpus(engine_overrides: dict[str, Any]) -> int | None:
        return None

    def _prepare_process(self) -> None:
        """Before vLLM starts: the engine's cores (vLLM's engine core and worker inherit this environment) and
        niceness."""
        options = self.spec.cpu
        raise_niceness(options.nice)  # the replica, then vLLM's processes it starts
        if "OMP_NUM_THREADS" not in self.spec.env:
            # Ray's, from num_cpus < 1. vLLM's engine core then runs torch at 1 thread as under `vllm serve`, and
            # its worker gets one OpenMP thread per core of the list below.
            os.environ.pop("OMP_NUM_THREADS", None)
        if options.omp_threads_bind != "auto":
            return
        available = available_cores()
        cores = claim_cores(options, available)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = core_list(cores)
        engine_core = "anywhere"
        if options.engine_core == "with_worker":  # the two take turns there (app.engine_core_cpu)
            os.environ[CORE_ENV] = str(cores[0])
            engine_core = f"on {cores[0]}"
        logger.info("model %s: vLLM's worker computes on cores %s, its engine core %s (of %s; share %s, nice %d)",
                    self.spec.name, core_list(cores), engine_core, core_list(available), options.share, options.nice)


def cpu_environment(spec: ModelSpec) -> dict[str, str]:
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(spec.cpu.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": spec.cpu.omp_threads_bind,  # 'auto': the replica sets a core list at start
        # vLLM 0.32's CPU build with torch 2.13 cannot load its AOT compile cache ("'function' object has no
        # attribute 'finalize_loading'") and compiles again at every start; the plain compile cache loads (-5 s).
        "VLLM_USE_AOT_COMPILE": "0",
        SPIN_ENV: str(spec.cpu.idle_spin_s),  # app.shm_spin
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


def raise_niceness(nice: int) -> None:
    """This process at niceness `nice` at least: never lowered (that needs privileges; Ray starts workers at 15 unless
    RAY_worker_niceness says otherwise)."""
    current = os.nice(0)
    if nice > current:
        os.nice(nice - current)


def available_cores(cpu_max: pathlib.Path = CGROUP_CPU_MAX) -> list[int]:
    """The cores this process may run on: its CPU affinity, the first ceil(quota) of them under a cgroup CPU quota."""
    cores = sorted(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = cores[: max(1, math.ceil(int(quota) / int(period)))]
    return cores


def pick_cores(options: CPUOptions, cores: list[int], claimed: dict[int, int]) -> list[int]:
    """The worker's cores out of `cores`, given how many engines of the node already compute on each (`claimed`).
    Pure: the rule of CPUOptions' docs."""
    reserved = options.reserved_cpus if options.reserved_cpus is not None else (1 if len(cores) >= 2 else 0)
    reserved = min(reserved, len(cores) - 1)
    wanted = min(options.threads or len(cores) - reserved, len(cores))
    if options.share == "shared":
        return cores[:wanted]
    # Free cores first, the reserved ones (the last) after the others, then the least claimed.
    order = sorted(range(len(cores)), key=lambda i: (claimed.get(cores[i], 0), i >= len(cores) - reserved, i))
    return sorted(cores[i] for i in order[:wanted])


def claim_cores(options: CPUOptions, cores: list[int], claims_file: pathlib.Path = CLAIMS_FILE) -> list[int]:
    """`pick_cores` against the node's claim table; an `own` pick is recorded for this process (claims of processes
    that are gone are dropped)."""
    claims_file.touch(exist_ok=True)
    with claims_file.open("r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            table = {int(pid): list(c) for pid, c in json.loads(f.read() or "{}").items()
                     if psutil.pid_exists(int(pid))}
        except (ValueError, AttributeError):
            table = {}
        table.pop(os.getpid(), None)
        claimed = Counter(core for owned in table.values() for core in owned)
        picked = pick_cores(options, cores, claimed)
        if options.share == "own":
            table[os.getpid()] = picked
        f.seek(0)
        f.truncate()
        f.write(json.dumps(table))
    return picked


def core_list(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> '0,1,2,5': vLLM's VLLM_CPU_OMP_THREADS_BIND syntax for one worker."""
    return ",".join(map(str, cores))

