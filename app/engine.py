"""The engine replica: one vLLM engine serving vLLM's own OpenAI app on an HTTP server of its own.

`vllm serve`'s server runs unchanged, so chat templates, sampling parameters, logprobs, usage accounting and error
bodies are exactly those of `vllm serve`, and response bytes go straight from it to the router's socket: no Ray
message carries them. It runs in a child process of the replica (`app.engine_process`), or, for engines whose
workers are Ray actors in the replica's placement group, inside the replica (`app.engine_inprocess`).
The replica tells Ray Serve its URL and routes (`record_replica_metadata`), which Serve's controller pushes to
every router (`app.replica_directory`), bounds its engine requests at `max_ongoing_requests` (`app.admission`)
and reports its load to Serve's autoscaler (`record_autoscaling_stats`). Serve keeps the replica's lifecycle,
placement group, health checks, constructor retries and scaling. GPU models run here; CPU models in its subclass
`app.cpu.CPUEngineServer`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app import adapters, engine_errors
from app.autoscaling import engine_load
from app.backend import installed_vllm_build, runtime_problem
from app.config import ModelSpec
from app.engine_inprocess import InReplicaEngine
from app.engine_process import EngineProcess

logger = logging.getLogger("ray.serve")

ROUTERS_NOTICE_S = 1.0  # a stopping replica is out of the routers' tables by then (Serve's controller pushes it)


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

        context = serve.get_replica_context()
        self._registry = (context.app_name, context.deployment)  # where the router records run-time adapters
        source = self.spec.resolved_source()
        server_spec = {"source": source, "name": self.spec.name, "overrides": engine_overrides,
                       "lora_modules": self.spec.resolved_lora_adapters()}
        host = InReplicaEngine if self._uses_ray_workers(engine_overrides) else EngineProcess
        logger.info("model %s: starting vLLM engine from %s with %s (%s)", self.spec.name, source, engine_overrides,
                    host.__name__)
        self._errors = engine_errors.collecting()
        self.engine = host(self.spec.name, server_spec, _max_ongoing_requests(), self._errors)
        try:
            await self.engine.start()
        except BaseException:
            await self.engine.stop()
            self._errors.unlink(missing_ok=True)
            raise  # Serve retries the constructor up to the deployment's max_constructor_retry_count, then gives up
        self.url = self.engine.url
        logger.info("model %s: ready at %s (tasks %s, max_model_len %d)", self.spec.name, self.url, self.engine.tasks,
                    self.engine.max_model_len)

    def _prepare_process(self) -> None:
        """Process settings the engine's processes inherit, set before vLLM starts (CPU engines: their cores)."""

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
        return {"url": self.url, "routes": self.engine.routes}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this every `metrics_interval_s` of an autoscaled deployment (`app.autoscaling`)."""
        return engine_load(await self.engine.ongoing())

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy and replaces it. Also hands the
        engine a changed `max_ongoing_requests` (Serve changes it in place)."""
        await self.engine.check_health(_max_ongoing_requests())

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
        engine = getattr(self, "engine", None)
        if engine is None or not engine.url:
            return
        await asyncio.sleep(ROUTERS_NOTICE_S)  # requests routed just before the controller's push still count
        try:
            if engine.closed is None:
                await engine.close("stopping")  # any later one goes to another replica
            # Serve force-stops the replica after graceful_shutdown_timeout_s; a broken engine would never finish.
            while engine.closed == "stopping" and await engine.ongoing():
                await asyncio.sleep(0.1)
        finally:
            await engine.stop()
            self._errors.unlink(missing_ok=True)


def _max_ongoing_requests() -> int:
    """This deployment's max_ongoing_requests as Serve has it now (a config change updates it in place)."""
    from ray import serve

    return serve.get_replica_context()._deployment_config.max_ongoing_requests
