"""`app.worker_fork`: the engine core (a spawned child of its replica) forks its workers, bound to the cores vLLM
chose for them; the replica keeps spawn."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app import worker_fork
from conftest import ROOT

# A replica (parent) that spawns its engine core (child), as vLLM does inside a Ray actor; each loads the plugin
# and says which start method vLLM would then use for its own children.
REPLICA = """
import multiprocessing, os, sys, types
from app import worker_fork

def engine_core():
    import torch  # its OpenMP starts here, unbound: a thread per core, on every core

    sys.modules["vllm.plugins"] = types.SimpleNamespace(plugins_loaded=True)  # vLLM's flag, as the core has it
    worker_fork.install()
    print("engine core", os.environ["VLLM_WORKER_MULTIPROC_METHOD"], flush=True)
    os.environ |= {"OMP_NUM_THREADS": "1", "OMP_PLACES": "{0}"}  # what vLLM sets while it starts a worker on core 0
    if os.fork() == 0:  # a worker: vLLM will load the plugins in it again
        print("worker loads plugins", not sys.modules["vllm.plugins"].plugins_loaded, flush=True)
        print("worker computes on", sorted(os.sched_getaffinity(0)), "with", torch.get_num_threads(), flush=True)
        os._exit(0)
    os.wait()

if __name__ == "__main__":
    worker_fork.install()
    print("replica", os.environ["VLLM_WORKER_MULTIPROC_METHOD"], flush=True)
    p = multiprocessing.get_context("spawn").Process(target=engine_core)
    p.start()
    p.join()
"""


ALL = sorted(os.sched_getaffinity(0))  # unbound: OpenMP's default, a thread per core


@pytest.mark.parametrize(("active", "engine_core_method", "reloads", "binding"),
                         [("1", "fork", True, "[0] with 1"), ("0", "spawn", False, f"{ALL} with {len(ALL)}")])
def test_only_the_engine_core_switches_to_fork_and_its_workers_load_plugins_and_bind_openmp(
        tmp_path, active, engine_core_method, reloads, binding):
    script = tmp_path / "replica.py"  # a file: spawn re-imports the parent's main module in the child
    script.write_text(REPLICA)
    env = {**os.environ, worker_fork.ACTIVATE_ENV: active, "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
           "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    said = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert said.stdout.splitlines() == ["replica spawn", f"engine core {engine_core_method}",
                                        f"worker loads plugins {reloads}", f"worker computes on {binding}"], said.stderr


@pytest.mark.parametrize(("environ", "cores"), [
    ({"OMP_PLACES": "{0,2,3}"}, [0, 2, 3]),  # vLLM's own setting
    ({"GOMP_CPU_AFFINITY": "1 3"}, [1, 3]),  # with libgomp preloaded
    ({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[4,5]", "KMP_BLOCKTIME": "5"}, [4, 5]),  # libiomp
    ({"OMP_NUM_THREADS": "2"}, []),  # no cores: nothing to bind
])
def test_openmp_cores_are_read_from_vllms_settings(environ, cores):
    assert worker_fork.openmp_cores(environ) == cores
