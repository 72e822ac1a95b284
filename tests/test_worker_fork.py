"""`app.worker_fork`: the engine core (a spawned child of its replica) forks its workers; the replica keeps spawn."""

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
import multiprocessing, os
from app import worker_fork

def engine_core():
    worker_fork.install()
    print("engine core", os.environ["VLLM_WORKER_MULTIPROC_METHOD"], flush=True)

if __name__ == "__main__":
    worker_fork.install()
    print("replica", os.environ["VLLM_WORKER_MULTIPROC_METHOD"], flush=True)
    p = multiprocessing.get_context("spawn").Process(target=engine_core)
    p.start()
    p.join()
"""


@pytest.mark.parametrize(("active", "engine_core_method"), [("1", "fork"), ("0", "spawn")])
def test_only_the_engine_core_of_a_replica_switches_to_fork(tmp_path, active, engine_core_method):
    script = tmp_path / "replica.py"  # a file: spawn re-imports the parent's main module in the child
    script.write_text(REPLICA)
    env = {**os.environ, worker_fork.ACTIVATE_ENV: active, "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
           "PYTHONPATH": str(ROOT)}
    said = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert said.stdout.splitlines() == ["replica spawn", f"engine core {engine_core_method}"], said.stderr

