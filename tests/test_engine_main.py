"""`app.engine_main`: the admission middleware inside the engine's own process (vLLM's server), steered by its
replica over the control route; the replica's side (`app.engine_process`) is exercised by every integration test."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from app import engine_main
from app.admission import REFUSED_HEADER

TOKEN = "secret"
CHAT = "/v1/chat/completions"


def vllm_like_app(started: asyncio.Event, release: asyncio.Event) -> Starlette:
    async def chat(request):
        started.set()
        await release.wait()
        return JSONResponse({"ok": True})

    async def health(request):
        return JSONResponse({})

    app = Starlette(routes=[Route(CHAT, chat, methods=["POST"]), Route("/tokenize", chat, methods=["POST"]),
                            Route("/health", health)])
    app.state.engine_client = Engine()
    return app


class Engine:
    """What the control route reads of vLLM's engine client."""

    model_config = SimpleNamespace(max_model_len=2048)

    async def get_supported_tasks(self):
        return ("generate",)


@pytest.fixture
def admission_env(monkeypatch):
    monkeypatch.setenv(engine_main.TOKEN_ENV, TOKEN)
    monkeypatch.setenv(engine_main.LIMIT_ENV, "1")


def client_of(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://engine")


def control(client: httpx.AsyncClient, token: str | None = TOKEN, **change):
    headers = {engine_main.TOKEN_HEADER.decode(): token} if token else {}
    return client.post(engine_main.CONTROL_PATH, json=change, headers=headers)


def test_the_control_route_reports_load_and_routes_and_moves_the_limit(admission_env):
    async def main():
        started, release = asyncio.Event(), asyncio.Event()
        app = vllm_like_app(started, release)
        app.add_middleware(engine_main.ReplicaAdmission)  # as vLLM's --middleware adds it
        async with client_of(app) as client:
            busy = asyncio.create_task(client.post(CHAT, json={}))
            await started.wait()
            state = (await control(client)).json()
            assert state == {"ongoing": 1, "limit": 1, "closed": None, "routes": ["/tokenize", CHAT],
                             "tasks": ["generate"], "max_model_len": 2048}
            full = await client.post(CHAT, json={})
            assert full.status_code == 503 and full.headers[REFUSED_HEADER.decode()] == "full"
            assert (await control(client, max_ongoing_requests=2)).json()["limit"] == 2
            started.clear()
            second = asyncio.create_task(client.post(CHAT, json={}))  # under the new limit
            await started.wait()
            assert (await control(client)).json()["ongoing"] == 2
            release.set()
            assert [r.status_code for r in await asyncio.gather(busy, second)] == [200, 200]
            assert (await control(client, closed="stopping")).json()["ongoing"] == 0
            stopping = await client.post(CHAT, json={})
            assert stopping.status_code == 503 and stopping.headers[REFUSED_HEADER.decode()] == "stopping"
            assert (await client.get("/health")).status_code == 200  # GETs are never refused

    asyncio.run(main())


@pytest.mark.parametrize("token", [None, "wrong"])
def test_only_the_replica_may_steer_it(admission_env, token):
    async def main():
        app = vllm_like_app(asyncio.Event(), asyncio.Event())
        app.add_middleware(engine_main.ReplicaAdmission)
        async with client_of(app) as client:
            assert (await control(client, token, closed="stopping", max_ongoing_requests=0)).status_code == 403
            assert (await control(client)).json()["closed"] is None

    asyncio.run(main())
