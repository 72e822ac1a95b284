"""vLLM's engine processes die with the replica that started them, however the replica dies.

vLLM starts its engine core (and, with the `mp` executor, its workers) as multiprocessing children. A clean
stop shuts them down; a SIGKILL of the replica, `ray stop --force`, a node's OOM killer or a crash does not,
and they would live on holding memory (and GPUs). vLLM loads `vllm.general_plugins` in every engine-core and
worker process: there this plugin asks the kernel for SIGKILL when the parent dies (Linux PR_SET_PDEATHSIG),
so the whole tree follows the replica. Active where the replica's environment sets `LLM_APP_DIE_WITH_PARENT=1`.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

ACTIVATE_ENV = "LLM_APP_DIE_WITH_PARENT"
PR_SET_PDEATHSIG = 1


def install() -> None:
    """The `vllm.general_plugins` entry point: in a multiprocessing child, die with the parent."""
    if os.environ.get(ACTIVATE_ENV) != "1" or not sys.platform.startswith("linux"):
        return
    parent = multiprocessing.parent_process()
    if parent is None:  # the replica itself, or a Ray actor (Ray owns those)
        return
    die_with(parent.pid)


def die_with(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
