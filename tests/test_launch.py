"""The process bookkeeping of `scripts/launch.py`: free ports for servers, run ids of parallel test workers, process
roles for the benchmark's CPU profile."""

from __future__ import annotations

import socket
import subprocess
import sys

import psutil
import pytest

from launch import (PORT_RANGE, RAY_SETTINGS, RAY_START_TIMED_OUT, ROOT, Server, again_once_if_ray_timed_out, free_port,
                    of_run, process_role)


class FakeProcess:
    def __init__(self, pid: int, command: str, parent: FakeProcess | None = None):
        self.pid, self.command, self.parent = pid, command, parent

    def cmdline(self) -> list[str]:
        return self.command.split()

    def parents(self) -> list[FakeProcess]:
        chain, proc = [], self.parent
        while proc is not None:
            chain.append(proc)
            proc = proc.parent
        return chain


def test_free_ports_are_outside_the_ephemeral_range_free_and_never_handed_out_twice():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # the OS picks from its ephemeral range, which free_port avoids
        assert taken.getsockname()[1] not in PORT_RANGE
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports) and all(port in PORT_RANGE for port in ports)
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


# Fails the first time (as `serve run` does when Ray's raylet registers too late), then runs until stopped.
FLAKY_START = f"""
import pathlib, sys, time
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.touch()
    sys.exit("Exception: {RAY_START_TIMED_OUT}. This could happen because ...")
print("started", flush=True)
time.sleep(600)
"""


def test_a_server_whose_ray_timed_out_starting_is_started_once_more(tmp_path):
    server = Server([sys.executable, "-c", FLAKY_START, str(tmp_path / "marker")], "http://127.0.0.1:1",
                    tmp_path / "server.log")
    first = server.process
    first.wait(timeout=60)
    try:
        assert server.alive() and server.process is not first and server.process.poll() is None
        second = server.process
        assert server.alive() and server.process is second  # running: left alone
    finally:
        server.stop()
    assert not server.alive()  # once only
    assert RAY_START_TIMED_OUT in server.log_tail()  # the first run's log is kept


def test_a_server_that_failed_otherwise_is_not_started_again(tmp_path):
    server = Server([sys.executable, "-c", "raise SystemExit('no such model')"], "http://127.0.0.1:1",
                    tmp_path / "server.log")
    server.process.wait(timeout=60)
    assert not server.alive() and not server.restarted


def test_a_workers_processes_belong_to_the_run_and_no_other_runs_do():
    assert of_run("abc", "abc") and of_run("abc-gw1", "abc")
    assert not of_run("abcd", "abc") and not of_run("ab", "abc") and not of_run(None, "abc")
    assert not of_run("abc", "abc-gw0")  # a worker checks only its own


def test_roles_name_replicas_by_deployment_and_engine_processes_by_their_replica():
    root = FakeProcess(1, "/venv/bin/python3 /venv/bin/serve run --address local cpu.yaml")
    raylet = FakeProcess(2, "/venv/ray/raylet --raylet_socket_name=x", root)
    router = FakeProcess(3, "ray::ServeReplica:default:ingress", raylet)
    chat = FakeProcess(4, "ray::ServeReplica:default:tiny-chat", raylet)
    core = FakeProcess(5, "VLLM::EngineCore", chat)
    worker = FakeProcess(6, "VLLM::Worker", core)
    haproxy = FakeProcess(7, "/venv/bin/haproxy-with-parent -f /tmp/ray_haproxy/haproxy.cfg", raylet)
    controller = FakeProcess(8, "ray::ServeController.listen_for_change", raylet)
    roles = {p.pid: process_role(p, root) for p in (root, raylet, router, chat, core, worker, haproxy, controller)}
    assert roles == {1: "server", 2: "ray (raylet, gcs, agents, workers)", 3: "ingress", 4: "tiny-chat",
                     5: "tiny-chat EngineCore", 6: "tiny-chat Worker", 7: "haproxy", 8: "serve controller"}


def test_vllm_serves_own_engine_processes_have_no_replica():
    root = FakeProcess(1, "python -m vllm.entrypoints.openai.api_server --model m")
    core = FakeProcess(2, "VLLM::EngineCore", root)
    assert process_role(root, root) == "server" and process_role(core, root) == "EngineCore"


def test_device_cpu_per_token_is_the_difference_over_the_output_tokens():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("cpu_roles", ROOT / "scripts" / "device" / "cpu_roles.py")
    cpu_roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_roles)
    before = {"ingress": 10.0, "tiny-chat Worker": 100.0}
    after = {"ingress": 12.0, "tiny-chat Worker": 110.0, "benchmark client": 0.0001}
    assert cpu_roles.per_token(before, after, 100_000) == {"tiny-chat Worker": 100.0, "ingress": 20.0}
    assert list(cpu_roles.per_token(before, after, 100_000)) == ["tiny-chat Worker", "ingress"]  # busiest first


def test_stop_children_of_session_kills_only_that_sessions_children(tmp_path):
    """What a test cluster's shutdown uses for what Ray lost track of (an untracked dashboard): this process's
    children carrying the session's path, and theirs; nothing else."""
    from conftest import stop_children_of_session, wait_for

    session, other = tmp_path / "session_a", tmp_path / "session_b"
    sleeper = ("import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    ours = subprocess.Popen([sys.executable, "-c", sleeper, f"--session-dir={session}"])
    theirs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--session-dir={other}"])
    try:
        grandchild = wait_for(lambda: psutil.Process(ours.pid).children(), 30, "the grandchild", 0.1)[0]
        stop_children_of_session(str(session))
        assert ours.wait(timeout=10) is not None
        assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
        assert theirs.poll() is None
    finally:
        for proc in (ours, theirs):
            proc.kill()
            proc.wait()


def test_a_worker_node_that_timed_out_starting_is_started_again_once():
    def starter(*failures: Exception):
        pending, calls = list(failures), []

        def start():
            calls.append(1)
            if pending:
                raise pending.pop(0)
            return "node"
        return start, calls

    start, calls = starter(Exception(RAY_START_TIMED_OUT))
    assert again_once_if_ray_timed_out(start) == "node" and len(calls) == 2
    start, calls = starter(RuntimeError("raylet crashed"))
    with pytest.raises(RuntimeError):
        again_once_if_ray_timed_out(start)
    assert len(calls) == 1
    start, calls = starter(Exception(RAY_START_TIMED_OUT), Exception(RAY_START_TIMED_OUT))
    with pytest.raises(Exception, match=RAY_START_TIMED_OUT):
        again_once_if_ray_timed_out(start)
    assert len(calls) == 2


def test_tests_and_benchmarks_run_the_app_with_make_serves_settings():
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(line for line in makefile.splitlines() if line.startswith("SERVE_ENV ="))
    make_env = dict(pair.split("=", 1) for pair in line.removeprefix("SERVE_ENV =").split())
    assert make_env.pop("RAY_SERVE_HAPROXY_BINARY_PATH") == "$(CURDIR)/.venv/bin/haproxy-with-parent"
    assert make_env == RAY_SETTINGS
