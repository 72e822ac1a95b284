"""vLLM's CPU engine core computes on its worker's first core.

For every step the engine core hands the batch to its worker and busy-waits (`sched_yield`) on shared memory for the
result; the worker busy-waits the same way for the next batch. Left free to run anywhere, the engine core's waiting
took about half of the core that vLLM reserves for everything else (its API server, the router, HAProxy, Ray), and
requests waited there before reaching the engine: on 2 cores, client-side median TTFT 160–270 ms against 25–45 ms
measured inside the engine. On the worker's first core (where the worker's main thread, OpenMP's thread 0, computes)
the two take turns, each waiting while the other works: median TTFT 44–64 ms, and more tokens per second.

A `vllm.general_plugins` entry point, active in the engine core process (vLLM names it `EngineCore`) where the replica
names the core in `LLM_APP_ENGINE_CORE_CPU` (`app.cpu`, for `cpu: {engine_core: with_worker}`). The worker, forked
from the engine core, takes its own cores (`app.worker_fork`).
"""

from __future__ import annotations

import multiprocessing
import os

CORE_ENV = "LLM_APP_ENGINE_CORE_CPU"


def install() -> None:
    core = os.environ.get(CORE_ENV)
    if core is None or not multiprocessing.current_process().name.startswith("EngineCore"):
        return
    # Every thread of the process: vLLM's ZMQ threads may have started before its plugins load.
    for thread in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread), {int(core)})
