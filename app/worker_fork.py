"""vLLM's workers forked from their engine core, not spawned.

vLLM's CPU platform sets `VLLM_WORKER_MULTIPROC_METHOD=spawn` in the engine process (`app.engine_main`) when it
builds the engine's config, as `vllm serve`'s CLI does everywhere; the engine core inherits it, and its `mp` workers
(on CPU every engine has one) would be spawned too, each one more process importing vLLM from scratch (about 10 s
of a core, measured). The engine core has no Ray in it and has run no model code, so vLLM's library default, fork,
is safe there, and vLLM still switches to spawn where it must (a Ray actor, CUDA initialised, WSL). A
`vllm.general_plugins` entry point; active where the replica's environment sets `LLM_APP_FORK_WORKERS=1`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

ACTIVATE_ENV = "LLM_APP_FORK_WORKERS"
_hooked = False


def install() -> None:
    global _hooked
    if os.environ.get(ACTIVATE_ENV) != "1" or multiprocessing.parent_process() is None:
        return  # the engine process itself keeps what vLLM chose for its engine core
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
    if not _hooked:
        os.register_at_fork(after_in_child=load_plugins_again)
        _hooked = True


def load_plugins_again() -> None:
    """In a forked worker vLLM must load its general plugins once more, as in a spawned one: the worker reconfigures
    vLLM's logging (dropping the handler `app.engine_errors` added) and a parent-death signal (`app.process_guard`)
    does not survive fork. vLLM loads them at the worker's start unless its flag says they are loaded."""
    plugins = sys.modules.get("vllm.plugins")
    if plugins is not None:
        plugins.plugins_loaded = False
