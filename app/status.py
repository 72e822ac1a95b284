"""Routes the router answers itself: `/v1/models`, `/health`, `/version` and `/metrics` (every replica of every
model, scraped from each replica's own server)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import time
from typing import Any

import aiohttp
from starlette.responses import JSONResponse, PlainTextResponse, Response

from app.adapters import Adapter
from app.asgi import header
from app.backend import installed_vllm
from app.metrics import IngressMetrics, merged_exposition
from app.model_table import ModelTable
from app.routing import require_api_key

ENGINE_CALL_TIMEOUT_S = 15.0


class Status:
    def __init__(self, table: ModelTable, metrics: IngressMetrics, session: aiohttp.ClientSession,
                 api_keys: list[str]):
        self.table, self.metrics, self.session, self.api_keys = table, metrics, session, api_keys
        self.created = int(time.time())
        self._engine_facts: dict[str, tuple[str, dict[str, Any]]] = {}  # model -> (replica asked, engine facts)
        self.routes = {
            ("GET", "/v1/models"): self.list_models,
            ("GET", "/health"): self.health,
            ("GET", "/version"): self.version,
            ("GET", "/metrics"): self.metrics_route,
        }

    async def list_models(self, scope) -> Response:
        """Every model and adapter, each with `ready`: whether a replica of its engine serves now (its engine started
        and its server answers). Ready ones come first, so a client that takes the first listed model (vLLM's
        benchmark client without --model) takes one that serves; a request for one still starting waits for it up to
        limits.starting_model_wait_s."""
        require_api_key(header(scope, b"authorization"), self.api_keys)
        cards = await asyncio.gather(*(self._model_card(m.name) for m in self.table.config.models))
        await self.table.adapters.refresh()
        listed = [*cards, *map(self._adapter_card, self.table.adapters.all())]
        return JSONResponse({"object": "list", "data": sorted(listed, key=lambda card: not card["ready"])})

    async def health(self, scope) -> Response:
        """200 when every model has a running replica whose engine answers its health check, else 503 naming why."""
        await self.table.explain_missing()
        problems = {}
        for name, pool in self.table.pools.items():
            urls = list(pool.urls().values())
            if not urls:  # e.g. an engine that cannot start: Serve's message carries the replica's error
                problems[name] = f"no running replica: {pool.problem or 'starting'}"
                continue
            try:
                async with self.session.get(f"{urls[0]}/health", timeout=_timeout(ENGINE_CALL_TIMEOUT_S)) as r:
                    if r.status != 200:
                        problems[name] = f"engine health {r.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                problems[name] = repr(e)
        if problems:
            return JSONResponse({"status": "unhealthy", "models": problems}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def version(self, scope) -> Response:
        return JSONResponse({"version": _dist_version("llm-serve-app"), "vllm": _vllm_version(),
                             "ray": _dist_version("ray")})

    async def metrics_route(self, scope) -> Response:
        """This router's series plus every engine replica's `vllm:*` series, scraped from each replica's server."""
        require_api_key(header(scope, b"authorization"), self.api_keys)
        targets = [(rid, url) for pool in self.table.pools.values() for rid, url in pool.urls().items()]
        texts = await asyncio.gather(*(self._get_text(f"{url}/metrics") for _, url in targets),
                                     return_exceptions=True)
        engine_texts = {rid: t for (rid, _), t in zip(targets, texts) if isinstance(t, str)}
        # Parsing vLLM's exposition costs ~10 ms per replica (2-core VM): off the event loop, where it would stall
        # every stream this router relays (85 ms with 8 replicas); a thread yields the GIL every 5 ms.
        body = await asyncio.to_thread(merged_exposition, self.metrics.exposition(), engine_texts)
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _get_text(self, url: str) -> str:
        async with self.session.get(url, timeout=_timeout(ENGINE_CALL_TIMEOUT_S)) as r:
            return await r.text()

    def _adapter_card(self, adapter: Adapter) -> dict[str, Any]:
        base = self.table.config.model(adapter.base)
        return {"id": adapter.name, "object": "model", "created": self.created, "owned_by": "vllm",
                "root": adapter.path, "parent": adapter.base, "task": base.task,
                "backend": self.table.backends[base.name], "ready": bool(self.table.pools[base.name].replicas)}

    async def _model_card(self, name: str) -> dict[str, Any]:
        """The model's card; `ready` says whether a replica can serve it now. Engine facts (max_model_len) come from
        one of its running replicas, asked again once that replica is gone (a new config may have changed them)."""
        spec, pool = self.table.config.model(name), self.table.pools[name]
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "vllm", "root": spec.source,
                "parent": None, "task": spec.task, "backend": self.table.backends[name], "ready": bool(pool.replicas)}
        cached = self._engine_facts.get(name)
        if cached is not None and cached[0] in pool.replicas:
            return card | cached[1]
        for replica_id, url in pool.urls().items():
            try:
                engine_card = json.loads(await self._get_text(f"{url}/v1/models"))["data"][0]
            except (aiohttp.ClientError, TimeoutError, KeyError, IndexError, ValueError):
                continue
            self._engine_facts[name] = (replica_id, {"max_model_len": engine_card.get("max_model_len")})
            return card | self._engine_facts[name][1]
        return card  # still starting: listed without engine facts


def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _vllm_version() -> str | None:
    found = installed_vllm()
    return found[1] if found else None
