"""`app.process_guard`: a multiprocessing child (as vLLM's engine core is of its replica) dies with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from app import process_guard
from conftest import ROOT

PARENT = """
import multiprocessing, sys, time
from app import process_guard

def child():
    process_guard.install()
    time.sleep(600)

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    p = multiprocessing.Process(target=child)
    p.start()
    print(p.pid, flush=True)
    time.sleep(600)
"""


def orphan_after_parent_killed(tmp_path, guarded: bool) -> psutil.Process | None:
    script = tmp_path / "parent.py"  # a file: spawn re-imports the parent's main module in the child
    script.write_text(PARENT)
    env = {**os.environ, process_guard.ACTIVATE_ENV: "1" if guarded else "0", "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    time.sleep(3)  # the child is past install()
    assert child.is_running()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    _, alive = psutil.wait_procs([child], timeout=10)
    return alive[0] if alive else None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_guarded_child_dies_with_its_killed_parent(tmp_path):
    assert orphan_after_parent_killed(tmp_path, guarded=True) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_without_the_guard_the_child_is_orphaned(tmp_path):
    orphan = orphan_after_parent_killed(tmp_path, guarded=False)
    try:
        assert orphan is not None and orphan.is_running()
    finally:
        if orphan is not None:
            orphan.kill()


def test_install_does_nothing_in_a_process_that_is_not_a_multiprocessing_child(monkeypatch):
    monkeypatch.setenv(process_guard.ACTIVATE_ENV, "1")
    process_guard.install()  # this test process has no multiprocessing parent: no signal is armed
    assert psutil.Process().is_running()
