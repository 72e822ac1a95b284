"""The router in process (`app.ingress.Router`, `app.relay`, `app.status`, `app.lora_admin`): an ASGI client in
front, fake engine replicas (small aiohttp servers on loopback) behind; no Ray. Milliseconds per test."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import httpx
import pytest
from aiohttp import web

from app import lora_admin
from app.admission import REFUSED_HEADER
from app.config import AppConfig
from app.ingress import Router, new_session
from app.model_table import ModelTable

CHAT = "/v1/chat/completions"
ROUTES = [CHAT, "/v1/completions", "/tokenize"]


class FakeEngine:
    """One engine replica's HTTP server: answers chat (JSON or SSE), health, metrics and LoRA admin calls."""

    def __init__(self, name: str, refuse: str | None = None):
        self.name, self.refuse, self.bodies, self.admin = name, refuse, [], []
        app = web.Application()
        app.router.add_post(CHAT, self.chat)
        app.router.add_post("/v1/load_lora_adapter", self.lora)
        app.router.add_get("/health", lambda r: web.Response(text=""))
        app.router.add_get("/metrics", lambda r: web.Response(
            text=f'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name="m"}} 1.0\n'))
        app.router.add_get("/v1/models", lambda r: web.json_response({"data": [{"id": "m", "max_model_len": 77}]}))
        self.runner = web.AppRunner(app)

    async def start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if self.refuse:
            return web.json_response({"error": {"message": "full"}}, status=503,
                                     headers={REFUSED_HEADER.decode(): self.refuse})
        body = await request.json()
        self.bodies.append(body)
        if not body.get("stream"):
            return web.json_response({"object": "chat.completion", "engine": self.name})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(f'data: {{"i": {i}}}\n\n'.encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def lora(self, request: web.Request) -> web.Response:
        self.admin.append(await request.json())
        return web.Response(text="Success")


def config(lora: bool = False, **deployment) -> AppConfig:
    return AppConfig.model_validate({"models": [
        {"name": "m", "source": "x", "backend": "cpu", "engine_args": {"enable_lora": lora},
         "deployment": {"max_ongoing_requests": 4, **deployment}},
        {"name": "e", "source": "y", "backend": "cpu", "task": "embed"},
    ]})


@asynccontextmanager
async def router(engines: dict[str, FakeEngine], app_config: AppConfig | None = None, dead: int = 0):
    """An httpx client on the router, model `m` served by `engines` (+ `dead` replicas that refuse connections)."""
    app_config = app_config or config()
    table = ModelTable(app_config, "llm", {"m": "m", "e": "e"}, {"m": "cpu", "e": "cpu"})
    running = {rid: {"url": await engine.start(), "routes": ROUTES} for rid, engine in engines.items()}
    running |= {f"dead{i}": {"url": f"http://127.0.0.1:{1 + i}", "routes": ROUTES} for i in range(dead)}
    table.pools["m"].update(running)
    session = new_session()
    try:
        transport = httpx.ASGITransport(app=Router(app_config, table, session))
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            client.table = table
            yield client
    finally:
        await session.close()
        for engine in engines.values():
            await engine.runner.cleanup()


def chat(stream=False, model="m"):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 20))


def test_relays_the_engine_answer_unchanged_and_names_the_replica():
    async def main():
        async with router({"r1": FakeEngine("one")}) as client:
            r = await client.post(CHAT, json=chat())
            assert r.status_code == 200 and r.json() == {"object": "chat.completion", "engine": "one"}
            assert r.headers["x-served-by"] == "m" and r.headers["x-served-by-replica"] == "r1"
            assert REFUSED_HEADER.decode() not in r.headers

    run(main())


def test_streams_every_chunk_in_order():
    async def main():
        async with router({"r1": FakeEngine("one")}) as client:
            r = await client.post(CHAT, json=chat(stream=True))
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.text == "".join(f'data: {{"i": {i}}}\n\n' for i in range(3)) + "data: [DONE]\n\n"

    run(main())


def test_a_replica_full_with_other_routers_requests_sends_the_request_to_another():
    async def main():
        full, free = FakeEngine("full", refuse="full"), FakeEngine("free")
        async with router({"a": full, "b": free}) as client:
            answers = [await client.post(CHAT, json=chat()) for _ in range(4)]
            assert [r.json()["engine"] for r in answers] == ["free"] * 4
            assert len(free.bodies) == 4

    run(main())


def test_every_replica_full_gets_503_with_retry_after():
    async def main():
        engines = {"a": FakeEngine("a", refuse="full"), "b": FakeEngine("b", refuse="full")}
        async with router(engines, config(max_queued_requests=0)) as client:
            r = await client.post(CHAT, json=chat())
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "ServiceUnavailableError"
            assert "overloaded" in r.json()["error"]["message"]

    run(main())


def test_a_dead_replica_that_refuses_connections_is_skipped():
    async def main():
        alive = FakeEngine("alive")
        async with router({"ok": alive}, dead=2) as client:
            for _ in range(3):
                r = await client.post(CHAT, json=chat())
                assert r.status_code == 200 and r.json()["engine"] == "alive"

    run(main())


def test_unknown_model_and_wrong_route_get_openai_errors():
    async def main():
        async with router({"r1": FakeEngine("one")}) as client:
            r = await client.post(CHAT, json=chat(model="nope"))
            assert r.status_code == 404 and r.json()["error"]["param"] == "model"
            r = await client.post(CHAT, content=b"{not json")
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
            r = await client.get("/v2/anything")
            assert r.status_code == 404

    run(main())


def test_models_list_readiness_and_health_names_the_model_without_a_replica(monkeypatch):
    async def main():
        async with router({"r1": FakeEngine("one")}) as client:
            cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
            assert cards["m"]["ready"] is True and cards["m"]["max_model_len"] == 77
            assert cards["e"]["ready"] is False and "max_model_len" not in cards["e"]

            async def serve_says():
                client.table.pools["e"].problem = "vLLM's engine did not start: no weights"
            monkeypatch.setattr(client.table, "explain_missing", serve_says)
            r = await client.get("/health")
            assert r.status_code == 503
            assert r.json()["models"] == {"e": "no running replica: vLLM's engine did not start: no weights"}

    run(main())


def test_metrics_merge_every_replica_labelled():
    async def main():
        async with router({"r1": FakeEngine("one"), "r2": FakeEngine("two")}) as client:
            text = (await client.get("/metrics")).text
            assert 'replica="r1"' in text and 'replica="r2"' in text and "llm_ingress_" in text

    run(main())


def test_a_runtime_lora_load_runs_once_on_every_replica(monkeypatch):
    registry = {}
    monkeypatch.setattr(lora_admin, "register", lambda app, dep, name, path: registry.__setitem__(name, path))
    monkeypatch.setattr("app.adapters.registered", lambda app, dep: dict(registry) if dep == "m" else {})

    async def main():
        engines = {"a": FakeEngine("a"), "b": FakeEngine("b")}
        async with router(engines, config(lora=True)) as client:
            r = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/p"})
            assert r.status_code == 200, r.text
            assert [len(e.admin) for e in engines.values()] == [1, 1]
            assert registry == {"x": "/p"}
            cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
            assert cards["x"]["parent"] == "m"
            r = await client.post(CHAT, json=chat(model="x"))  # routes to the base model, body unchanged
            assert r.status_code == 200
            assert (engines["a"].bodies + engines["b"].bodies)[0]["model"] == "x"

    run(main())


@pytest.mark.parametrize("path,method,counted", [(CHAT, "POST", True), ("/v1/load_lora_adapter", "POST", False),
                                                 ("/metrics", "GET", False)])
def test_admission_counts_engine_requests_only(path, method, counted):
    from app.admission import Admission

    async def main():
        seen = []

        async def app(scope, receive, send):
            seen.append(scope["path"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        admission = Admission(app, lambda: 0)  # full
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=admission), base_url="http://e") as c:
            r = await c.request(method, path)
        if counted:
            assert r.status_code == 503 and r.headers[REFUSED_HEADER.decode()] == "full" and not seen
            assert r.json()["error"]["code"] == 503
        else:
            assert r.status_code == 200 and seen == [path]

    run(main())
