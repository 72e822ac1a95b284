"""Unit tests for the in-process ASGI bridge (`app.asgi_bridge`) with small Starlette and raw ASGI apps.

pytest-asyncio is not installed: each test drives its own event loop with `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from app.asgi_bridge import ForwardedRequest, ResponseStart, call_asgi, http_scope

TIMEOUT_S = 5.0  # any hang fails the test instead of blocking the suite


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


async def collect(app, request: ForwardedRequest, pause_s: float = 0.0) -> list:
    items = []
    async for item in call_asgi(app, request):
        items.append(item)
        if pause_s:
            await asyncio.sleep(pause_s)
    return items


def get(path: str = "/") -> ForwardedRequest:
    return ForwardedRequest("GET", path, [])


def starlette(endpoint, path: str = "/", methods=("GET",)) -> Starlette:
    return Starlette(routes=[Route(path, endpoint, methods=list(methods))])


# --- plain responses ------------------------------------------------------------------------------


def test_json_response_yields_start_then_body():
    async def endpoint(request):
        return JSONResponse({"ok": True, "text": "héllo"}, status_code=201, headers={"x-extra": "1"})

    items = run(collect(starlette(endpoint), get()))
    start, *body = items
    assert isinstance(start, ResponseStart)
    assert start.status == 201
    headers = dict(start.headers)
    assert headers["content-type"] == "application/json"
    assert headers["x-extra"] == "1"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in start.headers)
    assert body and all(isinstance(chunk, bytes) and chunk for chunk in body)
    assert json.loads(b"".join(body)) == {"ok": True, "text": "héllo"}
    assert int(headers["content-length"]) == len(b"".join(body))


def test_not_found_route_is_a_response():
    items = run(collect(starlette(lambda r: JSONResponse({})), get("/missing")))
    assert items[0].status == 404


def test_request_body_and_headers_arrive_intact():
    seen = {}

    async def endpoint(request: Request):
        seen["method"] = request.method
        seen["path"] = request.url.path
        seen["query"] = dict(request.query_params)
        seen["headers"] = dict(request.headers)
        seen["body"] = await request.body()
        return JSONResponse({"len": len(seen["body"])})

    body = '{"model": "m", "prompt": "naïve ✓"}'.encode() + b"\x00\xff" * 1000
    request = ForwardedRequest(
        "POST",
        "/v1/completions",
        [("Content-Type", "application/json"), ("X-Request-Id", "req-42"), ("X-Latin", "café")],
        body,
        "a=1&b=two",
    )
    items = run(collect(starlette(endpoint, "/v1/completions", ["POST"]), request))
    assert items[0].status == 200
    assert seen["method"] == "POST" and seen["path"] == "/v1/completions"
    assert seen["query"] == {"a": "1", "b": "two"}
    assert seen["body"] == body
    assert seen["headers"]["content-type"] == "application/json"
    assert seen["headers"]["x-request-id"] == "req-42"
    assert seen["headers"]["x-latin"] == "café"
    assert json.loads(b"".join(items[1:])) == {"len": len(body)}


def test_http_scope():
    scope = http_scope(ForwardedRequest("POST", "/tokenize", [("X-A", "b")], b"{}", "q=1"))
    assert scope["type"] == "http" and scope["method"] == "POST"
    assert scope["path"] == "/tokenize" and scope["raw_path"] == b"/tokenize"
    assert scope["query_string"] == b"q=1"
    assert scope["headers"] == [(b"x-a", b"b")]


# --- streaming ------------------------------------------------------------------------------------

CHUNKS = [f"data: {i}\n\n".encode() for i in range(40)]


def streaming_app(chunks, gap_s: float = 0.0, first_gap_s: float = 0.0) -> Starlette:
    async def endpoint(request):
        async def produce():
            for i, chunk in enumerate(chunks):
                yield chunk
                await asyncio.sleep(first_gap_s if i == 0 else gap_s)

        return StreamingResponse(produce(), media_type="text/event-stream")

    return starlette(endpoint)


def test_fast_chunks_for_a_slow_consumer_are_coalesced():
    items = run(collect(streaming_app(CHUNKS), get(), pause_s=0.02))
    start, *body = items
    assert start.status == 200 and dict(start.headers)["content-type"].startswith("text/event-stream")
    assert all(isinstance(chunk, bytes) and chunk for chunk in body)
    assert b"".join(body) == b"".join(CHUNKS)  # nothing lost, nothing reordered
    assert len(body) < len(CHUNKS) / 2  # joined into a few batches


def test_first_chunk_is_not_held_back_by_slow_later_chunks():
    async def scenario():
        app = streaming_app([b"first", b"second", b"third"], gap_s=0.0, first_gap_s=0.6)
        began = time.perf_counter()
        arrivals = []
        async for item in call_asgi(app, get()):
            if isinstance(item, bytes):
                arrivals.append((time.perf_counter() - began, item))
        return arrivals

    arrivals = run(scenario())
    first_at, first = arrivals[0]
    assert first == b"first"  # not joined with the later, slower chunks
    assert first_at < 0.4
    assert arrivals[-1][0] >= 0.5
    assert b"".join(chunk for _, chunk in arrivals) == b"firstsecondthird"


def timed_body(app, batch_interval_s: float) -> list[tuple[float, bytes]]:
    async def scenario():
        began = time.perf_counter()
        return [(time.perf_counter() - began, item) async for item in call_asgi(app, get(), batch_interval_s)
                if isinstance(item, bytes)]

    return run(scenario())


def test_batch_window_joins_a_steady_stream_into_one_message_per_window():
    arrivals = timed_body(streaming_app(CHUNKS, gap_s=0.005), batch_interval_s=0.05)
    assert b"".join(chunk for _, chunk in arrivals) == b"".join(CHUNKS)
    assert len(arrivals) <= 2 + (arrivals[-1][0] / 0.05) + 1  # the first chunk, then about one per window
    assert len(arrivals) < len(CHUNKS) / 4


def test_batch_window_never_delays_the_end_of_the_response():
    arrivals = timed_body(streaming_app([b"a", b"b", b"c"], gap_s=0.01), batch_interval_s=2.0)
    assert b"".join(chunk for _, chunk in arrivals) == b"abc"
    assert arrivals[-1][0] < 1.0  # the final chunk flushed the window at once


# --- failures -------------------------------------------------------------------------------------


def test_raw_app_raising_before_responding_propagates():
    async def app(scope, receive, send):
        await receive()
        raise ValueError("engine exploded")

    with pytest.raises(ValueError, match="engine exploded"):
        run(collect(app, get()))


def test_raw_app_returning_without_response_is_an_error():
    async def app(scope, receive, send):
        return None

    with pytest.raises(RuntimeError, match="before completing its response"):
        run(collect(app, get()))


def test_starlette_endpoint_raising_gives_500_without_hanging():
    async def endpoint(request):
        raise ValueError("handler exploded")

    try:
        items = run(collect(starlette(endpoint), get()))
    except ValueError:  # also acceptable: the exception itself reaches the consumer
        return
    assert items[0].status == 500


def test_app_failing_mid_stream_reaches_the_consumer():
    async def endpoint(request):
        async def produce():
            yield b"data: 1\n\n"
            await asyncio.sleep(0.01)
            raise RuntimeError("engine died mid-stream")

        return StreamingResponse(produce(), media_type="text/event-stream")

    with pytest.raises(Exception, match="engine died mid-stream"):
        run(collect(starlette(endpoint), get()))


def test_background_task_of_a_complete_response_is_not_cancelled():
    state = {"done": False}

    async def after_response():
        await asyncio.sleep(0.05)
        state["done"] = True

    async def endpoint(request):
        return JSONResponse({"ok": True}, background=BackgroundTask(after_response))

    async def scenario():
        items = await collect(starlette(endpoint), get())
        await asyncio.sleep(0.2)
        return items

    items = run(scenario())
    assert items[0].status == 200
    assert state["done"]


# --- cancellation ---------------------------------------------------------------------------------


def endless_app(state: dict) -> Starlette:
    async def endpoint(request):
        async def produce():
            try:
                for i in range(10_000):
                    state["produced"] = i + 1
                    yield f"data: {i}\n\n".encode()
                    await asyncio.sleep(0.01)
            finally:
                state["stopped_at"] = time.perf_counter()

        return StreamingResponse(produce(), media_type="text/event-stream")

    return starlette(endpoint)


def test_closing_the_consumer_stops_the_app():
    state: dict = {}

    async def scenario():
        stream = call_asgi(endless_app(state), get())
        assert isinstance(await stream.__anext__(), ResponseStart)
        for _ in range(3):
            assert isinstance(await stream.__anext__(), bytes)
        closed_at = time.perf_counter()
        await stream.aclose()
        produced = state["produced"]
        await asyncio.sleep(0.1)
        return closed_at, produced

    closed_at, produced = run(scenario())
    assert "stopped_at" in state, "the app kept running after the consumer closed"
    assert state["stopped_at"] - closed_at < 0.5
    assert state["produced"] == produced  # nothing produced after the close
    assert state["produced"] < 100


def test_cancelling_the_consumer_task_stops_the_app():
    state: dict = {}
    received = []

    async def consume():
        async for item in call_asgi(endless_app(state), get()):
            received.append(item)

    async def scenario():
        task = asyncio.create_task(consume())
        while len(received) < 3:
            await asyncio.sleep(0.005)
        cancelled_at = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return cancelled_at

    cancelled_at = run(scenario())
    assert "stopped_at" in state, "the app kept running after the consumer was cancelled"
    assert state["stopped_at"] - cancelled_at < 0.5


def test_raw_app_sees_disconnect_or_cancellation():
    state: dict = {}

    async def app(scope, receive, send):
        try:
            assert (await receive())["type"] == "http.request"
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            state["next"] = (await receive())["type"]  # blocks until the client goes away
        except asyncio.CancelledError:
            state["next"] = "cancelled"
            raise
        finally:
            state["finally"] = True

    async def scenario():
        stream = call_asgi(app, get())
        assert (await stream.__anext__()).status == 200
        assert await stream.__anext__() == b"partial"
        await stream.aclose()

    run(scenario())
    assert state["finally"]
    assert state["next"] in {"http.disconnect", "cancelled"}
