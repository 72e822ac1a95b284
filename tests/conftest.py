"""Shared fixtures: the real app, started once per test session with the config file users run."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningApp:
    """`serve run <config>` in a subprocess, on a free port; stopped with Ctrl-C like a user would."""

    def __init__(self, config: pathlib.Path, workdir: pathlib.Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        text = yaml.safe_load(config.read_text())
        text.setdefault("http_options", {})["port"] = self.port
        self.config = workdir / config.name
        self.config.write_text(yaml.safe_dump(text))
        self.log_path = workdir / f"{config.stem}-serve.log"
        serve = pathlib.Path(sys.executable).parent / "serve"
        self.process = subprocess.Popen(
            [str(serve), "run", str(self.config)],
            cwd=ROOT,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})},
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=20).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise TimeoutError(f"app not healthy after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="session")
def cpu_app(tmp_path_factory) -> RunningApp:
    app = RunningApp(ROOT / "serve_configs" / "cpu.yaml", tmp_path_factory.mktemp("cpu-app"))
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()


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


def pytest_collection_modifyitems(items):
    # Integration tests share one app per session; run the fast unit tests first.
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)
