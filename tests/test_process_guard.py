"""`app.process_guard`: a multiprocessing child (as vLLM's engine core is of its replica) dies with its parent."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys

import psutil
import pytest

from app import process_guard
from conftest import ROOT

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# The child says "armed" once past install(), then "orphaned" if it outlives its parent (it inherits the parent's
# stdout, so the test reads both from one pipe).
PARENT = """
import multiprocessing, os, time
from app import process_guard

def child(parent_pid):
    process_guard.install()
    print("armed", flush=True)
    while os.getppid() == parent_pid:
        time.sleep(0.05)
    print("orphaned", flush=True)
    time.sleep(600)

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    p = multiprocessing.Process(target=child, args=(os.getpid(),))
    p.start()
    print(p.pid, flush=True)
    time.sleep(600)
"""


def read_line(stream, timeout_s: float = 60) -> str:
    """The next line of `stream` ('' at its end), failing the test after `timeout_s`."""
    ready, _, _ = select.select([stream], [], [], timeout_s)
    assert ready, f"no output within {timeout_s} s"
    return stream.readline()


def kill_parent(tmp_path, guarded: bool) -> tuple[psutil.Process, str]:
    """Starts a parent with a multiprocessing child, SIGKILLs the parent once the child is past install(); returns
    the child and what it said after that ('' if it died without a word)."""
    script = tmp_path / "parent.py"  # a file: spawn re-imports the parent's main module in the child
    script.write_text(PARENT)
    env = {**os.environ, process_guard.ACTIVATE_ENV: "1" if guarded else "0", "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env, text=True)
    child = psutil.Process(int(read_line(parent.stdout)))
    assert read_line(parent.stdout) == "armed\n"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    return child, read_line(parent.stdout, timeout_s=20)


@linux_only
def test_a_guarded_child_dies_with_its_killed_parent(tmp_path):
    child, said = kill_parent(tmp_path, guarded=True)
    try:
        assert said == "", f"the child outlived its parent: {said!r}"
        _, alive = psutil.wait_procs([child], timeout=30)
        assert not alive
    finally:
        if child.is_running():
            child.kill()


@linux_only
def test_without_the_guard_the_child_is_orphaned(tmp_path):
    child, said = kill_parent(tmp_path, guarded=False)
    try:
        assert said == "orphaned\n" and child.is_running()
    finally:
        child.kill()


def armed_death_signal() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    sig = ctypes.c_int(0)
    assert libc.prctl(2, ctypes.byref(sig), 0, 0, 0) == 0  # PR_GET_PDEATHSIG
    return sig.value


@linux_only
def test_install_arms_nothing_in_a_process_that_is_not_a_multiprocessing_child(monkeypatch):
    monkeypatch.setenv(process_guard.ACTIVATE_ENV, "1")
    try:
        process_guard.install()  # this test process has no multiprocessing parent: it must not die with pytest's
        assert armed_death_signal() == 0
    finally:
        ctypes.CDLL(None).prctl(process_guard.PR_SET_PDEATHSIG, 0, 0, 0, 0)
