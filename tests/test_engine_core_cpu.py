"""`app.engine_core_cpu`: vLLM's engine core process (all its threads) moves to the core its replica names; no other
process does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app import engine_core_cpu
from conftest import ROOT

# A replica that spawns a child under vLLM's process name for it; the child already runs a second thread (as vLLM's
# ZMQ threads may), loads the plugin and says where each of its threads may run.
REPLICA = """
import multiprocessing, os, sys, threading
from app import engine_core_cpu

def child():
    started = threading.Event()
    threading.Thread(target=lambda: (started.set(), threading.Event().wait()), daemon=True).start()
    started.wait()
    engine_core_cpu.install()
    print(sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir("/proc/self/task")}), flush=True)

if __name__ == "__main__":
    p = multiprocessing.get_context("spawn").Process(target=child, name=sys.argv[1])
    p.start()
    p.join()
"""

ALL = tuple(sorted(os.sched_getaffinity(0)))


@pytest.mark.skipif(len(ALL) < 2, reason="needs two cores to tell a move")
@pytest.mark.parametrize(("process_name", "core", "threads_on"), [
    ("EngineCore", str(ALL[-1]), [(ALL[-1],)]),  # vLLM's engine core: every thread moves
    ("EngineCore_DP0", str(ALL[-1]), [(ALL[-1],)]),  # one of several (data parallel)
    ("VllmWorker-0", str(ALL[-1]), [ALL]),  # a worker takes its own cores (app.worker_fork)
    ("EngineCore", None, [ALL]),  # no core named: a GPU engine, or a CPU engine bound by the user
])
def test_only_the_engine_core_moves_to_the_named_core(tmp_path, process_name, core, threads_on):
    script = tmp_path / "replica.py"  # a file: spawn re-imports the parent's main module in the child
    script.write_text(REPLICA)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(engine_core_cpu.CORE_ENV, None)
    if core is not None:
        env[engine_core_cpu.CORE_ENV] = core
    said = subprocess.run([sys.executable, str(script), process_name], env=env, capture_output=True, text=True,
                          timeout=60)
    assert said.stdout.strip() == str(threads_on), said.stderr
