"""Why vLLM's engine did not start, told to the replica that started it.

vLLM raises the real cause (missing weights, a CUDA error, ...) in its engine-core or worker process and logs it
there; the replica only gets "Engine core initialization failed. See root cause above", which is what Ray Serve
would show in `serve run` and `/health`. A `vllm.general_plugins` entry point adds a logging handler in those
processes that appends each ERROR's exception line to a file the replica names (`LLM_APP_ENGINE_ERRORS`), and the
replica raises with those lines when the engine fails to start.
How often a failing engine is tried again is Ray Serve's `max_constructor_retry_count` (the deployment option).
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile

import psutil

ERRORS_ENV = "LLM_APP_ENGINE_ERRORS"


class _ExceptionLines(logging.Handler):
    MAX_LINES = 20  # start-up errors are few; later ones (the replica has its own logs) are not kept

    def __init__(self, path: str):
        super().__init__(logging.ERROR)
        self.path, self.written = path, 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.written >= self.MAX_LINES:
            return
        self.written += 1
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            line = f"{type(error).__name__}: {error}"
        else:
            line = record.getMessage()
        with open(self.path, "a") as f:
            f.write(line.replace("\n", " ")[:2000] + "\n")


def install() -> None:
    """The `vllm.general_plugins` entry point: in an engine process of a replica, record errors for it."""
    path = os.environ.get(ERRORS_ENV)
    log = logging.getLogger("vllm")
    # A forked worker (app/worker_fork.py) inherits its engine core's handler.
    if path and not any(isinstance(h, _ExceptionLines) and h.path == path for h in log.handlers):
        log.addHandler(_ExceptionLines(path))


FILE_PREFIX = "llm-app-engine-errors-"


def collecting() -> pathlib.Path:
    """A file the engine processes this replica starts from now on will record their errors in. Its name carries
    the replica's pid; files of replicas that are gone (SIGKILLed ones never remove theirs) are removed first."""
    remove_orphaned_files(pathlib.Path(tempfile.gettempdir()))
    fd, path = tempfile.mkstemp(prefix=f"{FILE_PREFIX}{os.getpid()}-", suffix=".log")
    os.close(fd)
    os.environ[ERRORS_ENV] = path
    return pathlib.Path(path)


def remove_orphaned_files(folder: pathlib.Path) -> None:
    for path in folder.glob(f"{FILE_PREFIX}*.log"):
        pid = path.name[len(FILE_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or not psutil.pid_exists(int(pid)):
            path.unlink(missing_ok=True)


def root_cause(path: pathlib.Path, limit: int = 3) -> str | None:
    """The distinct error lines recorded (the deepest cause usually comes first), or None."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    distinct = list(dict.fromkeys(line for line in lines if line.strip()))
    return " | ".join(distinct[:limit]) or None
