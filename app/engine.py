"""The engine replica: one vLLM async engine plus vLLM's own OpenAI server app on the replica's own HTTP server.

`vllm serve`'s FastAPI app runs unchanged on a uvicorn server inside the replica, so chat templates,
sampling parameters, logprobs, usage accounting and error bodies are exactly those of `vllm serve`, and
response bytes go straight from this process to the router's socket: no Ray message carries them.
The replica tells Ray Serve its URL and routes (`record_replica_metadata`), which Serve's controller pushes to
every router (`app.replica_directory`), bounds its own engine requests at `max_ongoing_requests` (`app.admission`)
and reports its load to Serve's autoscaler (`record_autoscaling_stats`). Serve keeps the replica's lifecycle,
placement group, health checks, constructor retries and scaling. GPU models run here; CPU models in its subclass
`app.cpu.CPUEngineServer`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from app import adapters, engine_errors
from app.admission import Admission
from app.autoscaling import engine_load
from app.backend import installed_vllm_build, runtime_problem
from app.config import ModelSpec

logger = logging.getLogger("ray.serve")

ROUTERS_NOTICE_S = 1.0  # a stopping replica is out of the routers' tables by then (Serve's controller pushes it)


def vllm_routes(app) -> list[str]:
    """The POST routes of vLLM's app for this model's tasks (what the router may send here)."""
    return sorted({r.path for r in app.routes if "POST" in (getattr(r, "methods", None) or ())})


class EngineServer:
    """A Ray Serve deployment class for GPU models (bound by `builder`, not decorated, so it stays testable)."""

    backend = "gpu"

    async def __init__(self, spec: dict[str, Any], engine_overrides: dict[str, Any]):
        self.spec = ModelSpec.model_validate(spec)
        self._prepare_process()
        problem = runtime_problem(self.backend, installed_vllm_build(), self._visible_gpus(engine_overrides),
                                  self.spec.accelerator)
        if problem:
            raise RuntimeError(f"model {self.spec.name!r} cannot start on this node: {problem}")
        from ray import serve

        from app import vllm_api

        context = serve.get_replica_context()
        source = self.spec.resolved_source()
        args = vllm_api.server_args(source, self.spec.name, engine_overrides, self.spec.resolved_lora_adapters())
        self._registry = (context.app_name, context.deployment)  # where the router records run-time adapters
        logger.info("model %s: starting vLLM engine from %s with %s", self.spec.name, source, engine_overrides)
        self._engine_cm = vllm_api.build_async_engine_client_from_engine_args(vllm_api.engine_args_from(args))
        self._errors = engine_errors.collecting()
        try:
            self.engine = await self._engine_cm.__aenter__()
        except Exception as e:
            cause = engine_errors.root_cause(self._errors) or f"{type(e).__name__}: {e}"
            self._errors.unlink(missing_ok=True)
            # Serve retries the constructor up to the deployment's max_constructor_retry_count, then gives up.
            raise RuntimeError(f"model {self.spec.name!r}: vLLM's engine did not start: {cause}") from e
        tasks = await self.engine.get_supported_tasks()
        vllm_app = vllm_api.build_app(args, tasks, self.engine.model_config)
        await vllm_api.init_app_state(self.engine, vllm_app.state, args, tasks)
        self.http = Admission(vllm_app, _max_ongoing_requests)
        self.url, self._server = await self._serve_http(vllm_app)
        # vLLM's engine-error handler stops this server once the engine died; the health check then fails.
        vllm_app.state.server = self._server
        self._routes = vllm_routes(vllm_app)
        logger.info("model %s: ready at %s (tasks %s, max_model_len %d)", self.spec.name, self.url, tasks,
                    self.engine.model_config.max_model_len)
        # vLLM's Ray workers live in this replica's placement group; where they ran at start (None: no Ray workers).
        self._placement = await asyncio.to_thread(_placement) if self._uses_ray_workers(engine_overrides) else None
        self._broken: str | None = None

    def _prepare_process(self) -> None:
        """Process settings the engine's processes inherit, set before vLLM starts (CPU engines: their cores)."""

    async def _serve_http(self, app) -> tuple[str, Any]:
        """vLLM's app on a uvicorn server of this replica, on a port the OS picks; returns (URL, server)."""
        import ray
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 0))
        config = uvicorn.Config(self.http, lifespan="on", log_level="warning", access_log=False,
                                timeout_keep_alive=75, loop="none")
        server = uvicorn.Server(config)
        self._server_task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._server_task.done():
                self._server_task.result()  # raises why it stopped
            await asyncio.sleep(0.05)
        return f"http://{ray.util.get_node_ip_address()}:{sock.getsockname()[1]}", server

    async def _sync_adapters(self) -> None:
        """Loads the registry's run-time LoRA adapters that this replica lacks, unloads those no longer in it;
        through vLLM's own load/unload routes of this replica's server."""
        if not self.spec.lora_enabled:
            return
        import aiohttp

        wanted = await asyncio.to_thread(adapters.registered, *self._registry)
        async with aiohttp.ClientSession(self.url) as http:
            async with http.get("/v1/models") as r:
                cards = (await r.json())["data"]
            loaded = {c["id"]: c["root"] for c in cards if c.get("parent")}
            for name, path in wanted.items():
                if name not in self.spec.lora_adapters and loaded.get(name) != path:
                    body = {"lora_name": name, "lora_path": path, "load_inplace": name in loaded}
                    await self._call_vllm(http, "/v1/load_lora_adapter", body)
            for name in loaded.keys() - wanted.keys() - self.spec.lora_adapters.keys():
                await self._call_vllm(http, "/v1/unload_lora_adapter", {"lora_name": name})

    async def _call_vllm(self, http, path: str, body: dict[str, Any]) -> None:
        async with http.post(path, json=body) as r:
            if r.status != 200:  # e.g. an adapter's files gone since it was loaded elsewhere: serve the rest
                logger.warning("model %s: %s %s failed: %s", self.spec.name, path, body, await r.text())

    async def record_replica_metadata(self) -> dict[str, Any]:
        """Serve calls this once, after __init__ and before the replica is RUNNING; its controller pushes the answer
        to every router. The run-time LoRA adapters are synced here, as late as possible: routers load new ones on
        the replicas they know, and this one is not known before it is RUNNING."""
        await self._sync_adapters()
        return {"url": self.url, "routes": self._routes}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this every `metrics_interval_s` of an autoscaled deployment (`app.autoscaling`)."""
        return engine_load(self.http.count)

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        if self._server_task.done():
            raise RuntimeError(f"model {self.spec.name!r}: the replica's HTTP server stopped")
        if self._placement is not None and self._broken is None:
            # A node holding some of vLLM's workers went away: vLLM shuts its executor down but its engine neither
            # fails nor answers (requests hang), so only the placement group tells.
            now = await asyncio.to_thread(_placement)
            if now != self._placement:
                self._broken = (f"model {self.spec.name!r}: its placement group changed from {self._placement} to "
                                f"{now} (a node with vLLM workers was lost); replacing the replica")
                # Serve stops the replica only after its failed checks in a row: until then, no new requests (refused,
                # so routers try another replica), its open ones end with the error now, and its workers stop.
                from app import vllm_api

                self.http.closed = "broken"
                vllm_api.fail_in_flight(self.engine, self._broken)
                await asyncio.to_thread(self.engine.shutdown)
        if self._broken:
            raise RuntimeError(self._broken)
        await self.engine.check_health()

    @staticmethod
    def _uses_ray_workers(engine_overrides: dict[str, Any]) -> bool:
        return engine_overrides.get("distributed_executor_backend") == "ray"

    @staticmethod
    def _visible_gpus(engine_overrides: dict[str, Any]) -> int | None:
        if EngineServer._uses_ray_workers(engine_overrides):
            return None  # the replica holds no GPU; vLLM's Ray workers do
        import ray

        return len(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))

    async def __del__(self):
        """Graceful stop: routers stop sending here (the replica left RUNNING), open requests finish, then the
        server and the engine stop. Serve bounds this by the deployment's graceful_shutdown_timeout_s."""
        server = getattr(self, "_server", None)
        if server is not None:
            await asyncio.sleep(ROUTERS_NOTICE_S)  # requests routed just before the controller's push still count
            self.http.closed = "stopping"  # any later one goes to another replica
            # Serve force-stops the replica after graceful_shutdown_timeout_s; a broken engine would never finish.
            while self.http.count and not getattr(self, "_broken", None):
                await asyncio.sleep(0.1)
            server.should_exit = True
            await asyncio.wait([self._server_task], timeout=5)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
            self._errors.unlink(missing_ok=True)


def _max_ongoing_requests() -> int:
    """This deployment's max_ongoing_requests as Serve has it now (a config change updates it in place)."""
    from ray import serve

    return serve.get_replica_context()._deployment_config.max_ongoing_requests


def _placement() -> tuple[str, dict] | None:
    """(state, bundle index -> node id) of the calling replica's placement group; None outside one."""
    from ray.util import get_current_placement_group, placement_group_table

    group = get_current_placement_group()
    if group is None:
        return None
    table = placement_group_table(group)
    return table["state"], dict(table["bundles_to_node_id"])
