"""Where the embedded default's vLLM processes compute (serve_configs/cpu.yaml, the shared app): each engine core on
its worker's first core (`app.engine_core_cpu`), the embedding engine at its lower priority. (Which cores a worker
gets depends on the other apps of the machine, e.g. the suite's other worker: `app.cpu`'s rule, tested in
test_cpu.py.)"""

from __future__ import annotations

import os

import psutil
import pytest

from launch import process_role

pytestmark = pytest.mark.integration


def engine_processes(app) -> dict[str, dict[str, psutil.Process]]:
    """{model: {"EngineCore": process, "Worker": process}} of the app's vLLM processes, by the replica above them."""
    root, *procs = app.processes()
    found: dict[str, dict[str, psutil.Process]] = {}
    for proc in procs:
        if " ".join(proc.cmdline()).startswith("VLLM::"):
            model, _, title = process_role(proc, root).rpartition(" ")  # "tiny-chat EngineCore"
            found.setdefault(model, {})[title] = proc
    return found


def thread_cores(proc: psutil.Process) -> set[tuple[int, ...]]:
    return {tuple(sorted(os.sched_getaffinity(t.id))) for t in proc.threads()}


def test_each_engine_core_computes_on_its_workers_first_core(base_url, request):  # base_url: the shared app's group
    if os.environ.get("APP_URL"):
        pytest.skip("reads the processes of the app the tests started")
    engines = engine_processes(request.getfixturevalue("cpu_app"))
    assert set(engines) == {"tiny-chat", "all-MiniLM-L6-v2"}, engines
    for model, procs in engines.items():
        worker = sorted(os.sched_getaffinity(procs["Worker"].pid))  # its main thread: OpenMP's thread 0
        assert thread_cores(procs["EngineCore"]) == {(worker[0],)}, (model, worker)
    assert engines["all-MiniLM-L6-v2"]["EngineCore"].nice() == 10 and engines["tiny-chat"]["EngineCore"].nice() == 0
