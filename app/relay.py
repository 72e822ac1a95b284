"""Requests that run on an engine: read `model` (and what limits need), pick a replica, pipe the bytes.

The router parses only what routing and limits need (`model`, `stream`, `n`, prompts, `max_tokens`), then relays
the request and the response bytes between the client and the chosen engine replica's HTTP server (vLLM's own
app) unchanged. A replica that refuses the connection, or refuses the request as full or stopping
(`app.admission`), reached no engine: the request goes to another replica of the same model, or waits for one.
One that fails mid-answer hands the request on to another replica (`app.migration`): a stream continues from the
tokens it has. A client that goes away aborts its engine request: the connection to the engine closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid

import aiohttp

from app import migration
from app.admission import REFUSED_HEADER
from app.asgi import header, read_body, wait_for_disconnect
from app.config import AppConfig
from app.errors import APIError, engine_failed, overloaded
from app.metrics import IngressMetrics, RequestRecord
from app.model_table import ModelTable
from app.prefix_routing import prompt_text
from app.replicas import NoCapacity, ReplicaPool
from app.routing import check_limits, parse_json_object, require_api_key, route_request, spill_target, with_model

logger = logging.getLogger("ray.serve")

FORWARDED_HEADERS = {b"accept", b"endpoint-load-metrics-format", b"traceparent", b"tracestate"}
# Set by the router's own server, or by the router itself (x-request-id: the id it gave the engine).
HOP_HEADERS = {b"transfer-encoding", b"connection", b"keep-alive", b"date", b"server", b"x-request-id",
               REFUSED_HEADER}
CONNECT_ATTEMPTS = 3
REFUSED = REFUSED_HEADER.decode()


class EngineFailed(Exception):
    """The engine's answer broke off: an error event, an early end, a 5xx."""


class Relay:
    def __init__(self, config: AppConfig, table: ModelTable, metrics: IngressMetrics, session: aiohttp.ClientSession,
                 api_keys: list[str]):
        self.config, self.table, self.metrics, self.session, self.api_keys = config, table, metrics, session, api_keys
        self.in_flight: dict[str, int] = dict.fromkeys(table.pools, 0)  # this router's open requests, per model

    async def forward(self, scope, receive, send) -> None:
        route = scope["path"]
        record = RequestRecord(self.metrics, route, request_id(scope))
        try:
            require_api_key(header(scope, b"authorization"), self.api_keys)
            body = await read_body(scope, receive, self.config.limits.max_request_bytes)
            payload = parse_json_object(body)
            await self.table.adapters.learn(payload.get("model"))
            routed = route_request(self.config, route, payload, self.table.served(), self.table.adapters.bases())
            check_limits(payload, self.config.limits)
        except APIError as e:
            return await refuse(record, e, scope, send, finish=True)
        # An adapter exists on its base model only: no spillover.
        model = spill_target(routed.model, self.config, self.in_flight) if routed.adapter is None else routed.model
        if model is not routed.model:
            self.metrics.spillover.labels(routed.model.name, model.name).inc()
            body = with_model(payload, model.name)
            payload = {**payload, "model": model.name}
        record.model, record.backend = model.name, self.table.backends[model.name]
        pool = self.table.pools[model.name]
        prompt = prompt_text(route, payload) if pool.affinity is not None else None
        self.in_flight[model.name] += 1
        self.metrics.in_flight.labels(model.name).inc()
        relay = asyncio.create_task(self._relay(scope, body, payload, pool, record, send, prompt))
        disconnect = asyncio.create_task(wait_for_disconnect(receive))
        try:
            await asyncio.wait([relay, disconnect], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, disconnect):
                task.cancel()  # a client that went away aborts the engine request: its connection closes
            await asyncio.gather(relay, disconnect, return_exceptions=True)
            self.in_flight[model.name] -= 1
            self.metrics.in_flight.labels(model.name).dec()
            record.finish(record.status or 499)

    async def _relay(self, scope, body: bytes, payload: dict, pool: ReplicaPool, record: RequestRecord, send,
                     prompt: str | None) -> None:
        """Relays the engine's answer; a replica that fails mid-answer hands the request on (`app.migration`)."""
        headers = {"content-type": "application/json", "x-request-id": record.request_id}
        headers |= {k.decode(): v.decode() for k, v in scope["headers"] if k in FORWARDED_HEADERS}
        route = scope["path"]
        path = route + (f"?{scope['query_string'].decode()}" if scope.get("query_string") else "")
        left = migration.attempts(route, self.config.model(pool.model).migration_limit)
        stream = migration.Continuation(route, payload) if left and migration.continuable(route, payload) else None
        buffered = left > 0 and not payload.get("stream")  # nothing reaches the client before the whole body
        request = stream.engine_body(body) if stream else body
        started = streaming = False
        failed: str | None = None  # the replica that failed, while the request looks for another
        while True:
            replica = None
            try:
                async with self._engine_response(pool, path, request, headers, prompt,
                                                 migration.WAIT_S if failed else None) as (replica, response):
                    if failed:
                        self._migrated(record, pool.model, failed, replica.replica_id, stream)
                    if response.status >= 500 and left:
                        raise EngineFailed(f"status {response.status}")
                    data = await response.read() if buffered else b""
                    if not started:
                        record.status = response.status
                        record.first_byte()
                        out = [(k, v) for k, v in response.raw_headers if k.lower() not in HOP_HEADERS]
                        out.append((b"x-served-by", pool.model.encode()))  # Serve's replica server adds x-request-id
                        out.append((b"x-served-by-replica", replica.replica_id.encode()))
                        streaming = response.content_type == "text/event-stream"
                        await send({"type": "http.response.start", "status": response.status, "headers": out})
                        started = True
                    elif response.status != 200:  # a continuation refused: the stream cannot go on
                        raise APIError(response.status, (await response.text())[:500], "InternalServerError")
                    if data:
                        record.chunk(data)
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                    elif stream is not None and streaming:
                        await self._relay_stream(response, stream, record, send)
                    else:
                        async for chunk in response.content.iter_any():
                            record.chunk(chunk)
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b""})
                    return
            except APIError as e:
                if not started:
                    return await refuse(record, e, scope, send)
                return await self._fail(record, e, send, streaming)
            except (aiohttp.ClientError, EngineFailed) as e:
                error = engine_failed(f"The engine failed to answer: {type(e).__name__}: {e}")
                if replica is not None:
                    pool.mark_down(replica, f"failed a request ({type(e).__name__}: {e})")
                if not left or (started and stream is None and not buffered):
                    if not started:
                        return await refuse(record, error, scope, send)
                    return await self._fail(record, error, send, streaming)
                left -= 1
                failed = replica.replica_id if replica is not None else getattr(e, "replica_id", "-")
                if stream is not None:
                    stream.pending = b""  # the broken-off event's start
                if stream is not None and stream.finished:  # every token relayed: only the end is missing
                    record.chunk(tail := stream.tail(bool((payload.get("stream_options") or {}).get("include_usage"))))
                    await send({"type": "http.response.body", "body": tail, "more_body": True})
                    return await send({"type": "http.response.body", "body": b""})
                if stream is not None and stream.head is not None:
                    request = stream.continuation()
                    if request is None:
                        return await self._fail(record, error, send, streaming)

    async def _relay_stream(self, response, stream: migration.Continuation, record: RequestRecord, send) -> None:
        """A continuable stream's events, whole ones only; raises EngineFailed where the engine's stream broke off."""
        async for chunk in response.content.iter_any():
            events, failed = stream.feed(chunk)
            if events:
                record.chunk(events)
                await send({"type": "http.response.body", "body": events, "more_body": True})
            if failed:
                raise EngineFailed("an engine error event")
        if not stream.done:
            raise EngineFailed("the stream ended early")

    def _migrated(self, record: RequestRecord, model: str, failed: str, to: str, stream) -> None:
        carried = stream.base if stream is not None else 0
        record.migrations.append({"from": failed, "to": to, "tokens": carried})
        self.metrics.migrations.labels(model).inc()
        logger.warning("model %s: request %s moved from replica %s to %s carrying %d tokens", model,
                       record.request_id, failed, to, carried)

    @staticmethod
    async def _fail(record: RequestRecord, error: APIError, send, streaming: bool) -> None:
        """Ends a started answer: a stream with one error event and [DONE]; a JSON body is cut off (never mended)."""
        record.status = 500
        await send({"type": "http.response.body", "body": error.sse_event() if streaming else b"",
                    "more_body": not streaming})
        if not streaming:
            raise error

    @contextlib.asynccontextmanager
    async def _engine_response(self, pool: ReplicaPool, path: str, body: bytes, headers: dict[str, str],
                               prompt: str | None, wait_s: float | None = None):
        """(replica, the engine's response) from a replica with a free slot (the pool's choice, given the prompt),
        held until the block ends. A request no engine took (connection refused, refused as full or stopping) is
        tried on another replica, or waits in the pool's bounded queue (at most `wait_s` for a slot)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.limits.request_timeout_s
        connect_failures = 0
        while True:
            try:
                async with pool.slot(min(deadline - loop.time(), wait_s or math.inf), prompt) as replica:
                    try:
                        async with asyncio.timeout(deadline - loop.time()):
                            response = await self.session.post(f"{replica.url}{path}", data=body, headers=headers)
                    except aiohttp.ClientConnectorError:
                        pool.mark_down(replica)
                        connect_failures += 1
                        if connect_failures == CONNECT_ATTEMPTS:
                            raise
                        continue
                    except aiohttp.ClientError as e:  # e.g. the replica died before it answered
                        pool.mark_down(replica, f"failed a request ({type(e).__name__})")
                        e.replica_id = replica.replica_id
                        raise
                    except TimeoutError:
                        raise APIError(504, "The engine did not answer in time (limits.request_timeout_s).",
                                       "GatewayTimeoutError") from None
                    refused = response.headers.get(REFUSED)
                    if refused is not None:
                        response.release()
                        self.metrics.refusals.labels(pool.model, refused).inc()
                        if refused == "full":
                            pool.mark_refused(replica)
                        else:  # stopping or broken: out of the tables soon
                            pool.mark_down(replica, f"is {refused}")
                        continue
                    pool.mark_accepted(replica)
                    try:
                        yield replica, response
                    finally:
                        response.close()  # no-op once read; an unfinished one drops its connection (engine aborts)
                    return
            except NoCapacity as e:
                raise overloaded(str(e)) from None


async def refuse(record: RequestRecord, error: APIError, scope, send, finish: bool = False) -> None:
    record.status = error.status
    await error.response()(scope, None, send)
    if finish:  # refused before the relay started: account for it here
        record.finish(error.status)


def request_id(scope) -> str:
    """Ray Serve's id for this request: the client's X-Request-Id, or one Serve made (and returns)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or header(scope, b"x-request-id") or uuid.uuid4().hex
