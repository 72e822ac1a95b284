"""How long vLLM's worker busy-waits for its next step before it sleeps.

vLLM's shared-memory broadcast reader (the worker waiting for the engine core's next batch) spins with `sched_yield`
for `SpinCondition.busy_loop_s` (1 s, not configurable) after every read before it sleeps on a ZMQ notification.
Under load steps follow each other within milliseconds, so the spin only matters between requests, where each second of
it is a second of a core taken from the other engines, the router and the tests: measured on 2 cores, twelve chats
half a second apart cost the worker 6.9 CPU-s with vLLM's 1 s and 1.7 CPU-s with 0.1 s, 2 s apart 12.4 against 1.9,
with the same latencies. 0 made every request wait ~5 s (the reader's 5 s recheck), so the value must be above 0.

A `vllm.general_plugins` entry point, active where the replica sets `LLM_APP_SHM_SPIN_S` (`app.cpu`, from the model's
`cpu.idle_spin_s`): vLLM's own class, with another default.
"""

from __future__ import annotations

import os

SPIN_ENV = "LLM_APP_SHM_SPIN_S"


def install() -> None:
    if not os.environ.get(SPIN_ENV):
        return
    from vllm.distributed.device_communicators import shm_broadcast

    original = shm_broadcast.SpinCondition.__init__
    if hasattr(original, "spin_s"):  # installed already in this process
        return
    spin_s = float(os.environ[SPIN_ENV])

    def __init__(self, *args, **kwargs):
        if len(args) < 4:  # busy_loop_s not given by position
            kwargs.setdefault("busy_loop_s", spin_s)
        original(self, *args, **kwargs)

    __init__.spin_s = spin_s
    shm_broadcast.SpinCondition.__init__ = __init__
