"""Shared fixtures: the real app, started once per test session with the config file users run."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
import uuid

import httpx
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# vLLM's own switch for its CPU CI, inherited by every server the tests start: the engines trace the model with
# dynamo and run it eagerly instead of compiling C++ kernels through torch inductor (on a new machine that costs
# 20-40 s per model graph). Users' engines keep vLLM's default; `scripts/bench.py` measures that one.
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")
sys.path.insert(0, str(ROOT / "scripts"))
from launch import RUN_ID, Server, again_once_if_ray_timed_out, processes_of_run, running, serve_run  # noqa: E402

# Every process the suite starts inherits this run's id (so that what it leaves behind can be named and nothing
# else is touched) and keeps Ray's sessions in a folder of its own, not the user's /tmp/ray. Under `pytest -n`
# (xdist) each worker extends the id with its own name: a worker checks only its own processes, while
# `launch.py leftovers <id>` still finds every worker's.
os.environ.setdefault(RUN_ID, uuid.uuid4().hex)
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ[RUN_ID] = f"{os.environ[RUN_ID]}-{XDIST_WORKER}"
OWN_RAY_DIR = "RAY_TMPDIR" not in os.environ  # in the controller of `pytest -n`, not in its workers
if OWN_RAY_DIR:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="llmt-")


def import_script(name: str):
    """`scripts/<name>.py` as a module (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """The whole suite leaves no process behind (Ray, vLLM, HAProxy: anything carrying its run id), checked after
    every app of the session stopped."""
    yield
    deadline = time.monotonic() + 60
    while (left := processes_of_run(os.environ[RUN_ID])) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"processes outlived the test session's apps: {left}"


def pytest_unconfigure(config):
    if OWN_RAY_DIR:
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def cpu_app(tmp_path_factory) -> Server:
    with running(serve_run(ROOT / "serve_configs" / "cpu.yaml", tmp_path_factory.mktemp("cpu-app"))) as app:
        yield app


@pytest.fixture(scope="session")
def base_url(request) -> str:
    # APP_URL points the tests at an app that is already running (handy while developing).
    return os.environ.get("APP_URL") or request.getfixturevalue("cpu_app").url


@pytest.fixture(scope="session")
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def aclient_factory(base_url):
    from openai import AsyncOpenAI

    return lambda: AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def local_ray_cluster(**head_args):
    """`ray.cluster_utils.Cluster` on any machine (it writes its address file into Ray's default temp dir, /tmp/ray,
    even when given another one, and a fresh machine has no such directory until some Ray start), without the
    dashboard's web modules (no test of a cluster needs them), and whose shutdown also stops what Ray lost track of:
    Ray 2.60 leaves a dashboard that was not up within RAY_DASHBOARD_STARTUP_TIMEOUT_S (60 s, exceeded under load
    once) running untracked, and it outlived the cluster (a CI check run named it)."""
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    class OwnCluster(Cluster):
        def add_node(self, **node_args):
            if self.head_node is not None:
                return again_once_if_ray_timed_out(lambda: Cluster.add_node(self, **node_args))
            import psutil

            before = {p.pid for p in psutil.Process().children()}

            def start_head():
                try:
                    return Cluster.add_node(self, **node_args)
                except Exception:
                    # A head that timed out starting leaves its GCS, monitor, dashboard and log monitor running,
                    # untracked (the cluster has no head node to shut down): stop the processes this start began.
                    stop_children_except(before)
                    raise

            return again_once_if_ray_timed_out(start_head)

        def shutdown(self):
            session = self.head_node.get_session_dir_path() if self.head_node else None
            super().shutdown()
            if session:
                stop_children_of_session(session)

    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    return OwnCluster(initialize_head=True, head_node_args={"include_dashboard": False, **head_args})


def stop_children_except(pids: set[int]) -> None:
    """Kills this process's direct children that are not in `pids`, with their own children (an app started earlier
    by this process keeps the processes it starts meanwhile: they are its children, not ours)."""
    import psutil

    kill_trees(child for child in psutil.Process().children() if child.pid not in pids)


def stop_children_of_session(session_dir: str) -> None:
    """Kills this process's children that belong to the Ray session `session_dir` (by its path on their command
    line), with their own children."""
    import psutil

    def of_session(proc) -> bool:
        with contextlib.suppress(psutil.Error):
            return session_dir in " ".join(proc.cmdline())
        return False

    kill_trees(child for child in psutil.Process().children(recursive=True) if of_session(child))


def kill_trees(roots) -> None:
    """Kills each process of `roots` and its descendants, and waits (up to 10 s) for them to be gone."""
    import psutil

    procs = []
    for root in roots:
        with contextlib.suppress(psutil.Error):
            procs += [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


# Integration groups in the order xdist hands them out (`make test TEST_WORKERS=N`, loadgroup: each group runs whole
# in one worker). xdist gives a worker its next group as soon as it has at most 2 tests left, so a one-test group
# brings the next one along when it starts: the order below balances the two workers under that rule, simulated over
# the groups' measured times on 2 cores (about 755 / 805 s against 815 / 740 s for the longest-first order). Measured
# at 43b6248: 15.7, 16.2, 15.9 and 14.0 min with set-up (longest-first before it: 15.0, 15.4, 16.2). The suite is
# CPU-bound, so the order mostly moves the idle tail; what a group costs depends on what runs beside it. The
# session's shared app stays near the end, so that it does not idle beside the other groups' apps.
GROUP_ORDER = ["test_cpu_ray_platform", "test_control_plane", "test_spillover", "two_replicas", "test_rolling_update",
               "test_startup_failure", "test_reliability", "cpu_app", "test_gpu_placement"]


def integration_group(item) -> str | None:
    """The tests that must run in one process: those of one app (the session's shared app; a module's or a
    package's own app). None for a unit test."""
    if item.get_closest_marker("integration") is None:
        return None
    if {"cpu_app", "base_url"} & set(getattr(item, "fixturenames", ())):  # with what they need
        return "cpu_app"
    return item.path.parent.name if item.path.parent != ROOT / "tests" else item.path.stem


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    # The fast unit tests first, then the integration groups in GROUP_ORDER (a new group before the shared app).
    groups = {item: integration_group(item) for item in items}

    def rank(item) -> float:
        group = groups[item]
        if group is None:
            return -1
        return GROUP_ORDER.index(group) if group in GROUP_ORDER else GROUP_ORDER.index("cpu_app") - 0.5

    items.sort(key=rank)
    for item, group in groups.items():
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


def engine_metric_by_replica(base_url: str, name: str, model: str | None = None,
                             headers: dict | None = None) -> dict[str, float]:
    """replica id -> the engine's own series `name` (of `model`, or every model), as the router that answers lists
    its replicas in /metrics (a busy engine whose scrape timed out is missing)."""
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=60).text
    found = {}
    for labels, value in re.findall(rf"^{re.escape(name)}{{([^}}]*)}} (\S+)$", text, re.M):
        if model is None or f'model_name="{model}"' in labels:
            replica = re.search(r'replica="([^"]+)"', labels)
            found[replica.group(1) if replica else labels] = float(value)
    return found


def running_by_replica(base_url: str, model: str | None = None, headers: dict | None = None) -> dict[str, float]:
    """replica id -> the engine's own `vllm:num_requests_running` gauge."""
    return engine_metric_by_replica(base_url, "vllm:num_requests_running", model, headers)


def running_requests(base_url: str, model: str, headers: dict | None = None) -> float:
    """The engine's own `vllm:num_requests_running` gauge for `model` (NaN when the router's scrape of a busy engine
    timed out)."""
    return next(iter(running_by_replica(base_url, model, headers).values()), float("nan"))


def wait_for(condition, timeout_s: float, what: str, every_s: float = 1.0):
    """Calls `condition()` until it returns something truthy, which it returns; fails naming `what` after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(every_s)
    return value


def wait_until(read, predicate, timeout_s: float, what: str) -> float:
    """Calls `read()` until `predicate` holds for its value or the time is up; returns the last value read.
    On a busy 2-core machine one read can take many seconds: tests wait on work that outlasts that."""
    deadline = time.monotonic() + timeout_s
    while True:
        started = time.monotonic()
        value = read()
        # Every read, for the log of a failing test: when, how long, what.
        print(f"{time.strftime('%H:%M:%S')} /metrics {what}={value} in {time.monotonic() - started:.2f} s")
        if predicate(value) or time.monotonic() >= deadline:
            return value
        time.sleep(0.2)


def wait_running(base_url: str, model: str, predicate, timeout_s: float = 60.0, headers: dict | None = None) -> float:
    """Poll the running-requests gauge until `predicate` holds or the time is up; returns the last value read."""
    return wait_until(lambda: running_requests(base_url, model, headers), predicate, timeout_s, f"{model} running")
