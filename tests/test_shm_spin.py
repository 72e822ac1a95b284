"""`app.shm_spin`: vLLM's shared-memory reader busy-waits for `cpu.idle_spin_s` where the replica says so, vLLM's own
1 s elsewhere; the config refuses 0 (every request then waited ~5 s)."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest

from app.config import CPUOptions
from conftest import ROOT

# A reader's spin as vLLM makes one, after the plugin loaded (in a process of its own: the plugin patches vLLM's class).
READER = """
import zmq
from app import shm_spin
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
shm_spin.install()
shm_spin.install()  # vLLM may load plugins more than once in a process
print(SpinCondition(is_reader=True, context=zmq.Context(), notify_address="tcp://127.0.0.1:9").busy_loop_s)
print(SpinCondition(True, zmq.Context(), "tcp://127.0.0.1:9", 0.5).busy_loop_s)  # given by position: kept
"""


@pytest.mark.parametrize(("env", "spins"), [({"LLM_APP_SHM_SPIN_S": "0.1"}, ["0.1", "0.5"]),
                                            ({}, ["1", "0.5"])])  # vLLM's default
def test_the_reader_spins_as_long_as_the_replica_says(env, spins):
    done = subprocess.run([sys.executable, "-c", READER], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == spins


def test_idle_spin_defaults_to_a_tenth_of_a_second_and_must_be_above_zero():
    assert CPUOptions().idle_spin_s == 0.1
    with pytest.raises(pydantic.ValidationError):
        CPUOptions(idle_spin_s=0)
