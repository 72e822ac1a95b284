"""Calls an ASGI app in-process and streams its response back as a few coalesced messages.

The engine replica hands each forwarded request to vLLM's own FastAPI app this way: no socket, no
re-serialization. The first body chunk goes out at once (time to first token); later chunks that
arrived meanwhile are joined, so a slow consumer costs one Ray round trip per batch, not per token.
Cancelling the consumer disconnects the request, which makes vLLM abort its engine work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it; the body stays raw bytes."""

    method: str
    path: str
    headers: Headers
    body: bytes = b""
    query_string: str = ""


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: Headers


def http_scope(request: ForwardedRequest) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query_string.encode(),
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": ("ingress", 0),
        "server": ("engine", 0),
        "state": {},
    }


async def call_asgi(
    app, request: ForwardedRequest, batch_interval_s: float = 0.0
) -> AsyncIterator[ResponseStart | bytes]:
    """Yields a ResponseStart, then body bytes (coalesced) until the response is complete.

    After the first body chunk, chunks are gathered for up to `batch_interval_s` between yields (every
    yield is a Ray round trip, which costs far more CPU than a token); the end of the response goes out
    at once, so the window never adds to a request's latency.

    An app that fails mid-response raises here, so the caller can report it in-band. A consumer that
    stops early disconnects the request and cancels the app (vLLM aborts the engine request).
    """
    outbox: asyncio.Queue[dict | None] = asyncio.Queue()
    ended = asyncio.Event()  # the response is complete, or the app stopped: flush without waiting
    disconnected = asyncio.Event()
    body_taken = False

    async def receive() -> dict:
        nonlocal body_taken
        if not body_taken:
            body_taken = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        outbox.put_nowait(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            ended.set()

    async def run() -> None:
        try:
            await app(http_scope(request), receive, send)
        finally:
            outbox.put_nowait(None)
            ended.set()

    task = asyncio.create_task(run())
    complete = False
    last_yield = None
    try:
        while not complete:
            batch = [await outbox.get()]
            if last_yield is not None and batch_interval_s > 0:
                await _wait(ended, last_yield + batch_interval_s - time.monotonic())
            while not outbox.empty():  # coalesce what is already waiting
                batch.append(outbox.get_nowait())
            body = []
            for message in batch:
                if message is None:
                    if complete:
                        break
                    await task  # the app ended early: raise its exception, if any
                    raise RuntimeError("the app ended before completing its response")
                if message["type"] == "http.response.start":
                    yield ResponseStart(
                        message["status"],
                        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])],
                    )
                elif message["type"] == "http.response.body":
                    body.append(message.get("body", b""))
                    complete = not message.get("more_body", False)
            if any(body):
                yield b"".join(body)
                last_yield = time.monotonic()
    finally:
        if complete:  # background work after the response (if any) finishes on its own
            _background.add(task)
            task.add_done_callback(_background.discard)
        else:
            disconnected.set()
            # Let the app see the disconnect and abort its own work: vLLM runs each handler in a task of its own
            # and cancels it on disconnect; cancelling the app at once could orphan that task (and its engine work).
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until `event` is set or `timeout_s` passed, whichever comes first."""
    if timeout_s <= 0 or event.is_set():
        return
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass


_background: set[asyncio.Task] = set()
DISCONNECT_GRACE_S = 5.0
