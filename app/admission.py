"""The engine replica's own admission limit: at most `max_ongoing_requests` engine requests at once, however many
routers send them (each router only knows its own). Over the limit, and while the replica is stopping or broken,
the answer is an immediate 503 that names itself (`REFUSED_HEADER`), so that a router tries another replica.

Its count is also what the replica reports to Ray Serve's autoscaler and what a graceful stop waits for.
"""

from __future__ import annotations

import json
from collections.abc import Callable

REFUSED_HEADER = b"x-llm-app-refused"  # full | stopping | broken
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})  # never refused: the router's own calls


def counted(scope) -> bool:
    """Engine work: a POST that is not a LoRA admin call (GETs are health, metrics, model cards)."""
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] not in ADMIN_PATHS


class Admission:
    """ASGI middleware in front of vLLM's app."""

    def __init__(self, app, max_ongoing: Callable[[], int]):
        self.app, self.max_ongoing = app, max_ongoing  # read per request: Serve may change it without a restart
        self.count = 0  # engine requests open now
        self.closed: str | None = None  # why new engine requests are refused ("stopping", "broken")

    async def __call__(self, scope, receive, send):
        if not counted(scope):
            return await self.app(scope, receive, send)
        limit = self.max_ongoing()
        refusal = self.closed or ("full" if self.count >= limit else None)
        if refusal is not None:
            return await refuse(send, refusal, self.count, limit)
        self.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.count -= 1


async def refuse(send, reason: str, ongoing: int, limit: int) -> None:
    message = (f"This engine replica is at max_ongoing_requests ({ongoing}/{limit})." if reason == "full"
               else f"This engine replica is {reason}.")
    body = json.dumps({"error": {"message": message, "type": "ServiceUnavailableError", "param": None,
                                 "code": 503}}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"retry-after", b"1"), (REFUSED_HEADER, reason.encode())]})
    await send({"type": "http.response.body", "body": body})
