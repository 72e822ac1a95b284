"""Device experiment (issue 9): the app with time-windowed stream coalescing in the engine replica.

Measured on the device (benchmarks/gpu-h100-single.md): at 64 concurrent streams the app relays one
Ray streaming item per token through two hops (engine -> ingress -> proxy), because Ray Serve drains
the replica's generator as fast as it yields and `call_asgi` therefore never finds more than one chunk
waiting. This variant sleeps `window` after each body chunk it yields (the first chunk still goes at
once), so `call_asgi` joins the chunks that arrive meanwhile: fewer, larger items per stream.

The window (ms) is read per request from /tmp/stream_window_ms, so one running app can be measured at
several windows. Serve config: scripts/device/exp-stream-window.yaml. Not part of the app: the fix
belongs in app/asgi_bridge.py (or EngineServer.forward); this only measures what it would give.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import app.builder
from app.asgi_bridge import ForwardedRequest, ResponseStart, call_asgi
from app.engine import EngineServer

WINDOW_FILE = "/tmp/stream_window_ms"


def window_s() -> float:
    try:
        with open(WINDOW_FILE) as f:
            return max(0.0, float(f.read().strip()) / 1000)
    except (OSError, ValueError):
        return 0.0


class WindowedEngineServer(EngineServer):
    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        window = window_s()
        async for item in call_asgi(self.vllm_app, request):
            yield item
            if window and isinstance(item, bytes):
                await asyncio.sleep(window)  # call_asgi coalesces what arrives meanwhile


def build_app(args: dict[str, Any]):
    app.builder.EngineServer = WindowedEngineServer
    return app.builder.build_app(args)
