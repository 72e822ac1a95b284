"""vLLM's workers forked from their engine core, not spawned.

In a Ray actor vLLM must spawn its engine core (a fork would copy Ray's threads), and on CPU its platform asks for
spawn anyway; the choice is recorded in `VLLM_WORKER_MULTIPROC_METHOD`, which the engine core inherits: its `mp`
workers (on CPU every engine has one) are then spawned too, each one more process importing vLLM from scratch
(about 10 s of a core, measured). The engine core has no Ray in it and has run no model code, so fork is safe there,
and vLLM still switches to spawn where it must (a Ray actor, CUDA initialised, WSL). A `vllm.general_plugins` entry
point; active where the replica's environment sets `LLM_APP_FORK_WORKERS=1`.

vLLM binds a CPU worker's OpenMP threads through the environment it starts the worker in (`OMP_NUM_THREADS` and the
cores: `OMP_PLACES`, or `GOMP_CPU_AFFINITY` / `KMP_AFFINITY` where that OpenMP is preloaded), which OpenMP reads when
it starts in a new process. A forked worker's OpenMP started in its engine core, so the worker applies that binding
itself right after the fork (without it, it computed on every core with one thread per core).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys

ACTIVATE_ENV = "LLM_APP_FORK_WORKERS"
_hooked = False


def install() -> None:
    global _hooked
    if os.environ.get(ACTIVATE_ENV) != "1" or multiprocessing.parent_process() is None:
        return  # the replica itself (a Ray actor) keeps spawn
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
    if not _hooked:
        os.register_at_fork(after_in_child=start_worker)
        _hooked = True


def start_worker() -> None:
    load_plugins_again()
    bind_openmp(os.environ)


def bind_openmp(environ) -> None:
    """The OpenMP binding vLLM set in `environ` for the worker it is starting, applied to this process: its cores
    (the threads OpenMP starts later inherit them) and its thread count. Nothing where vLLM set no cores."""
    cores = openmp_cores(environ)
    if not cores:
        return
    os.sched_setaffinity(0, cores)
    torch = sys.modules.get("torch")
    if torch is not None and environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))


def openmp_cores(environ) -> list[int]:
    """The cores of vLLM's OpenMP settings: OMP_PLACES '{0,1}', GOMP_CPU_AFFINITY '0 1', KMP_AFFINITY
    '...,proclist=[0,1]'."""
    if places := environ.get("OMP_PLACES"):
        text = places
    elif gomp := environ.get("GOMP_CPU_AFFINITY"):
        text = gomp
    else:
        text = environ.get("KMP_AFFINITY", "").partition("proclist=")[2]
    return [int(core) for core in re.findall(r"\d+", text)]


def load_plugins_again() -> None:
    """In a forked worker vLLM must load its general plugins once more, as in a spawned one: the worker reconfigures
    vLLM's logging (dropping the handler `app.engine_errors` added) and a parent-death signal (`app.process_guard`)
    does not survive fork. vLLM loads them at the worker's start unless its flag says they are loaded."""
    plugins = sys.modules.get("vllm.plugins")
    if plugins is not None:
        plugins.plugins_loaded = False
