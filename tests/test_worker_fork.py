"""`app.worker_fork`: the engine core (a spawned child of the engine process) forks its workers; the engine process
keeps spawn."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app import worker_fork
from conftest import ROOT

# An engine process (parent) that spawns its engine core (child), as vLLM's CPU platform makes it; each loads the
# plugin and says which start method vLLM would then use for its own children.
REPLICA = """
import multiprocessing, os, sys, types
from app import worker_fork

def engine_core():
    sys.modules["vllm.plugins"] = types.SimpleNamespace(plugins_loaded=True)  # vLLM's flag, as the core has it
    worker_fork.install()
    print("engine core", os.environ["VLLM_WORKER_MULTIPROC_METHOD"], flush=True)
    if os.fork() == 0:  # a worker: vLLM will load the plugins in it again
        print("worker loads plugins", not sys.modules["vllm.plugins"].plugins_loaded, flush=True)
        os._exit(0)
    os.wait()

if __name__ == "__main__":
    worker_fork.install()
    print("engine process", os.environ["VLLM_WORKER_MULTIPROC_METHOD"], flush=True)
    p = multiprocessing.get_context("spawn").Process(target=engine_core)
    p.start()
    p.join()
"""


@pytest.mark.parametrize(("active", "engine_core_method", "reloads"), [("1", "fork", True), ("0", "spawn", False)])
def test_only_the_engine_core_switches_to_fork_and_its_workers_load_plugins(tmp_path, active,
                                                                                         engine_core_method, reloads):
    script = tmp_path / "replica.py"  # a file: spawn re-imports the parent's main module in the child
    script.write_text(REPLICA)
    env = {**os.environ, worker_fork.ACTIVATE_ENV: active, "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
           "PYTHONPATH": str(ROOT)}
    said = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert said.stdout.splitlines() == ["engine process spawn", f"engine core {engine_core_method}",
                                        f"worker loads plugins {reloads}"], said.stderr

