"""vLLM's OpenAI server for one model in a child process of its engine replica (the replica's side; the child is
`app.engine_main`).

The replica binds the server's socket (a port the OS picks) and starts the child with it; the child runs what
`vllm serve` runs, so the engine's HTTP path is `vllm serve`'s own, in a process with no Ray in it, and vLLM is
imported once per engine (the replica itself never imports it). The replica steers the child's admission limit
(`app.admission`) over a control route only it may call, asks vLLM's /health for its health checks, and stops the
child with SIGTERM (vLLM's own shutdown). The child dies with the replica however the replica dies
(PR_SET_PDEATHSIG), its engine core and worker with the child.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import secrets
import socket
import subprocess
import sys
from typing import Any

import aiohttp

from app import engine_errors
from app.engine_main import CONTROL_PATH, LIMIT_ENV, TOKEN_ENV, TOKEN_HEADER

KEEP_ALIVE_S = "75"  # vLLM's 5 s default would close the routers' pooled connections under them
STOP_TIMEOUT_S = 30.0


class EngineProcess:
    def __init__(self, name: str, server_spec: dict[str, Any], max_ongoing: int, errors: pathlib.Path):
        """`server_spec`: `app.engine_main`'s arguments for vLLM (source, name, overrides, lora_modules); `errors`:
        the file vLLM's processes record their errors in (`app.engine_errors`)."""
        self.name, self.server_spec, self.limit, self.errors = name, server_spec, max_ongoing, errors
        self.url, self.routes, self.tasks, self.max_model_len, self.closed = "", [], [], 0, None
        self.process: subprocess.Popen | None = None

    async def start(self) -> None:
        """Starts the child and returns once vLLM's /health answers 200; raises with vLLM's error if it exits."""
        import ray

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 0))
        port = sock.getsockname()[1]
        token = secrets.token_hex(16)
        spec = self.server_spec | {"host": "0.0.0.0", "port": port, "fd": sock.fileno(), "parent_pid": os.getpid()}
        env = os.environ | {TOKEN_ENV: token, LIMIT_ENV: str(self.limit), "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": KEEP_ALIVE_S}
        # Started from this (the replica's event-loop) thread: the child's death signal follows the thread that forked.
        self.process = subprocess.Popen([sys.executable, "-m", "app.engine_main", json.dumps(spec)], env=env,
                                        pass_fds=[sock.fileno()])
        sock.close()
        self.url = f"http://{ray.util.get_node_ip_address()}:{port}"
        self._http = aiohttp.ClientSession(f"http://127.0.0.1:{port}", headers={TOKEN_HEADER.decode(): token},
                                           timeout=aiohttp.ClientTimeout(total=30))
        while not await self._healthy():
            self._raise_if_exited("did not start")
            await asyncio.sleep(0.5)
        state = await self._control()
        self.routes, self.tasks, self.max_model_len = state["routes"], state["tasks"], state["max_model_len"]

    async def _healthy(self) -> bool:
        try:
            async with self._http.get("/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _raise_if_exited(self, what: str) -> None:
        code = self.process.poll()
        if code is not None:
            cause = engine_errors.root_cause(self.errors) or f"exit status {code}"
            raise RuntimeError(f"model {self.name!r}: vLLM's engine {what}: {cause}")

    async def _control(self, **change) -> dict[str, Any]:
        async with self._http.post(CONTROL_PATH, json=change) as r:
            r.raise_for_status()
            return await r.json()

    async def ongoing(self) -> int:
        """Engine requests open now."""
        return (await self._control())["ongoing"]

    async def close(self, reason: str) -> None:
        """New engine requests are refused from now on (`app.admission`), naming `reason`."""
        self.closed = reason
        await self._control(closed=reason)

    async def check_health(self, limit: int) -> None:
        """Raises unless the child runs and vLLM's /health answers 200; passes on a changed admission limit."""
        self._raise_if_exited("stopped")
        if limit != self.limit:
            await self._control(max_ongoing_requests=limit)
            self.limit = limit
        async with self._http.get("/health") as r:
            if r.status != 200:
                raise RuntimeError(f"model {self.name!r}: vLLM's /health answered {r.status}: {await r.text()}")

    async def stop(self) -> None:
        """vLLM's own shutdown (SIGTERM), then SIGKILL after STOP_TIMEOUT_S."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            for _ in range(int(STOP_TIMEOUT_S * 10)):
                if self.process.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_http", None) is not None:
            await self._http.close()
