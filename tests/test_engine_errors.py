"""`app.engine_errors`: an engine process's start-up error reaches the replica as its exception line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile

from app import engine_errors


def test_errors_logged_in_an_engine_process_become_the_root_cause(monkeypatch, tmp_path):
    path = tmp_path / "errors.log"
    monkeypatch.setenv(engine_errors.ERRORS_ENV, str(path))
    logger = logging.getLogger("vllm.test_engine_errors")
    engine_errors.install()
    try:
        try:
            raise RuntimeError("Cannot find any model weights with `/models/x`")
        except RuntimeError:
            logger.exception("WorkerProc failed to start.")
            logger.exception("WorkerProc failed to start.")  # repeated by several processes: said once
        logger.error("Engine core initialization failed.")
        logger.warning("not an error")
    finally:
        for handler in list(logging.getLogger("vllm").handlers):
            if isinstance(handler, engine_errors._ExceptionLines):
                logging.getLogger("vllm").removeHandler(handler)
    assert engine_errors.root_cause(path) == (
        "RuntimeError: Cannot find any model weights with `/models/x` | Engine core initialization failed.")


def test_without_a_file_named_nothing_is_recorded(monkeypatch):
    monkeypatch.delenv(engine_errors.ERRORS_ENV, raising=False)
    before = list(logging.getLogger("vllm").handlers)
    engine_errors.install()
    assert logging.getLogger("vllm").handlers == before


def test_a_forked_worker_records_errors_once(monkeypatch, tmp_path):
    monkeypatch.setenv(engine_errors.ERRORS_ENV, str(tmp_path / "errors.log"))
    log = logging.getLogger("vllm")
    before = list(log.handlers)
    try:
        engine_errors.install()  # the engine core (app/worker_fork.py)
        engine_errors.install()  # its forked worker, which inherited the handler
        assert len(log.handlers) == len(before) + 1
    finally:
        log.handlers = before


def test_no_file_means_no_cause(tmp_path):
    assert engine_errors.root_cause(tmp_path / "missing.log") is None


def test_a_new_replica_removes_the_files_of_replicas_that_are_gone(monkeypatch, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    prefix = engine_errors.FILE_PREFIX
    orphaned = tmp_path / f"{prefix}{dead_pid}-abc.log"
    unnamed = tmp_path / f"{prefix}x7_q.log"  # the older name without a pid
    living = tmp_path / f"{prefix}1-abc.log"  # pid 1 is always there
    for path in (orphaned, unnamed, living):
        path.write_text("RuntimeError: x\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(engine_errors.ERRORS_ENV, raising=False)
    mine = engine_errors.collecting()
    assert not orphaned.exists() and not unnamed.exists() and living.exists()
    assert mine.exists() and mine.name.startswith(f"{prefix}{os.getpid()}-")
