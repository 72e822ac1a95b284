"""vLLM's async engine and OpenAI app inside the engine replica itself: for engines whose workers are Ray actors in
the replica's placement group (vLLM's `ray` executor, e.g. pipeline parallel across nodes), which vLLM finds only
from inside the replica (its current placement group). Every other engine runs in a child process
(`app.engine_process`).

vLLM's FastAPI app runs unchanged on a uvicorn server of the replica, behind `app.admission`. The health check also
watches the placement group: a node holding some of vLLM's workers that went away leaves vLLM 0.26's engine neither
failed nor answering, so the replica fails its open requests, stops the engine and reports unhealthy.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import socket
from typing import Any

from app import engine_errors
from app.admission import Admission

logger = logging.getLogger("ray.serve")


class InReplicaEngine:
    def __init__(self, name: str, server_spec: dict[str, Any], max_ongoing: int, errors: pathlib.Path):
        self.name, self.server_spec, self.limit, self.errors = name, server_spec, max_ongoing, errors
        self.url, self.routes, self.tasks, self.max_model_len = "", [], [], 0
        self.engine = self.http = None
        self.broken: str | None = None

    @property
    def closed(self) -> str | None:
        return self.http.closed if self.http is not None else None

    async def start(self) -> None:
        from app import vllm_api
        from app.engine_main import post_routes

        spec = self.server_spec
        args = vllm_api.server_args(spec["source"], spec["name"], spec["overrides"], spec["lora_modules"])
        self._engine_cm = vllm_api.build_async_engine_client_from_engine_args(vllm_api.engine_args_from(args))
        try:
            self.engine = await self._engine_cm.__aenter__()
        except Exception as e:
            cause = engine_errors.root_cause(self.errors) or f"{type(e).__name__}: {e}"
            raise RuntimeError(f"model {self.name!r}: vLLM's engine did not start: {cause}") from e
        tasks = await self.engine.get_supported_tasks()
        self.tasks, self.max_model_len = list(tasks), self.engine.model_config.max_model_len
        vllm_app = vllm_api.build_app(args, tasks, self.engine.model_config)
        await vllm_api.init_app_state(self.engine, vllm_app.state, args, tasks)
        self.http = Admission(vllm_app, lambda: self.limit)
        self.url, self._server = await self._serve_http(self.http)
        # vLLM's engine-error handler stops this server once the engine died; the health check then fails.
        vllm_app.state.server = self._server
        self.routes = post_routes(vllm_app)
        # Where vLLM's Ray workers run, to tell when a node with some of them is lost.
        self._placement = await asyncio.to_thread(placement)

    async def _serve_http(self, app) -> tuple[str, Any]:
        """`app` on a uvicorn server of this replica, on a port the OS picks; returns (URL, server)."""
        import ray
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 0))
        config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False,
                                timeout_keep_alive=75, loop="none")
        server = uvicorn.Server(config)
        self._server_task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._server_task.done():
                self._server_task.result()  # raises why it stopped
            await asyncio.sleep(0.05)
        return f"http://{ray.util.get_node_ip_address()}:{sock.getsockname()[1]}", server

    async def ongoing(self) -> int:
        return self.http.count

    async def close(self, reason: str) -> None:
        self.http.closed = reason

    async def check_health(self, limit: int) -> None:
        self.limit = limit
        if self._server_task.done():
            raise RuntimeError(f"model {self.name!r}: the replica's HTTP server stopped")
        if self.broken is None:
            now = await asyncio.to_thread(placement)
            if now != self._placement:
                self.broken = (f"model {self.name!r}: its placement group changed from {self._placement} to "
                               f"{now} (a node with vLLM workers was lost); replacing the replica")
                # Serve stops the replica only after its failed checks in a row: until then, no new requests (refused,
                # so routers try another replica), its open ones end with the error now, and its workers stop.
                from app import vllm_api

                self.http.closed = "broken"
                vllm_api.fail_in_flight(self.engine, self.broken)
                await asyncio.to_thread(self.engine.shutdown)
        if self.broken:
            raise RuntimeError(self.broken)
        await self.engine.check_health()

    async def stop(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.should_exit = True
            await asyncio.wait([self._server_task], timeout=5)
        if self.engine is not None:
            self.engine.shutdown()


def placement() -> tuple[str, dict] | None:
    """(state, bundle index -> node id) of the calling replica's placement group; None outside one."""
    from ray.util import get_current_placement_group, placement_group_table

    group = get_current_placement_group()
    if group is None:
        return None
    table = placement_group_table(group)
    return table["state"], dict(table["bundles_to_node_id"])
