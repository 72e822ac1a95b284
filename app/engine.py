"""The engine replica: one vLLM async engine plus vLLM's own OpenAI server app, in one Ray Serve replica.

The ingress forwards raw HTTP requests here (method, path, headers, body bytes); they run through
the same FastAPI app that `vllm serve` builds, in-process. Chat templates, sampling parameters,
logprobs, usage accounting and error bodies therefore behave exactly as in `vllm serve`.
GPU models run here (engine deployments); CPU models run in its subclass `app.cpu.CPUEngineServer`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import types
from collections.abc import AsyncIterator
from typing import Any

from app.asgi_bridge import ForwardedRequest, ResponseStart, call_asgi
from app.backend import installed_vllm_build, runtime_problem
from app.config import ModelSpec

logger = logging.getLogger("ray.serve")

# vLLM starts its engine core in a subprocess; fork would copy the Ray worker's threads.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


class EngineServer:
    """A Ray Serve deployment class for GPU models (bound by `builder`, not decorated, so it stays testable)."""

    backend = "gpu"

    async def __init__(self, spec: dict[str, Any], engine_overrides: dict[str, Any]):
        self.spec = ModelSpec.model_validate(spec)
        problem = runtime_problem(self.backend, installed_vllm_build(), self._visible_gpus(engine_overrides),
                                  self.spec.accelerator)
        if problem:
            raise RuntimeError(f"model {self.spec.name!r} cannot start on this node: {problem}")
        from app import vllm_api

        source = self.spec.resolved_source()
        args = vllm_api.server_args(source, self.spec.name, engine_overrides)
        logger.info("model %s: starting vLLM engine from %s with %s", self.spec.name, source, engine_overrides)
        self._engine_cm = vllm_api.build_async_engine_client_from_engine_args(vllm_api.engine_args_from(args))
        self.engine = await self._engine_cm.__aenter__()
        tasks = await self.engine.get_supported_tasks()
        self.vllm_app = vllm_api.build_app(args, tasks, self.engine.model_config)
        # vLLM's engine-error handler tells its uvicorn server to exit once the engine died. There is no such
        # server here (a missing one turns the error into an AttributeError 500): the flag lands on this
        # stand-in, and Serve's health check (check_health) replaces the replica.
        self.vllm_app.state.server = types.SimpleNamespace(should_exit=False)
        await vllm_api.init_app_state(self.engine, self.vllm_app.state, args, tasks)
        self.max_model_len = self.engine.model_config.max_model_len
        self.batch_interval_s = self.spec.stream_batch_ms / 1000
        self._stats_task = asyncio.create_task(self._log_stats_forever())
        logger.info("model %s: ready (tasks %s, max_model_len %d)", self.spec.name, tasks, self.max_model_len)

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Streams the response of vLLM's app to `request`: a ResponseStart, then body batches."""
        async for item in call_asgi(self.vllm_app, request, self.batch_interval_s):
            yield item

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        await self.engine.check_health()

    async def describe(self) -> dict[str, Any]:
        return {"max_model_len": self.max_model_len, "root": self.spec.source, "task": self.spec.task}

    def metrics_text(self) -> str:
        """This replica's Prometheus exposition (vLLM's `vllm:*` series live in this process)."""
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY).decode()

    async def _log_stats_forever(self, interval_s: float = 10.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.engine.do_log_stats()

    @staticmethod
    def _visible_gpus(engine_overrides: dict[str, Any]) -> int | None:
        if engine_overrides.get("distributed_executor_backend") == "ray":
            return None  # the replica holds no GPU; vLLM's Ray workers do
        import ray

        return len(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
