"""The router in process (`app.ingress.Router`, `app.relay`, `app.status`, `app.lora_admin`): an ASGI client in
front, fake engine replicas (small aiohttp servers on loopback) behind; no Ray. Milliseconds per test."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from contextlib import asynccontextmanager

import httpx
import pytest
from aiohttp import web

from app import lora_admin, migration, status
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
            text='# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 1.0\n'))
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
            text = (await client.get("/metrics")).text  # refusals are counted (the pause skips "a" after one)
            assert re.search(r'^llm_ingress_engine_refusals_total{model="m",reason="full"} [1-4]\.0$', text, re.M)

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


def test_metrics_are_merged_off_the_event_loop(monkeypatch):
    threads = []

    def merge(*args):
        threads.append(threading.current_thread())
        return real(*args)

    real = status.merged_exposition
    monkeypatch.setattr(status, "merged_exposition", merge)

    async def main():
        async with router({"r1": FakeEngine("one")}) as client:
            assert 'replica="r1"' in (await client.get("/metrics")).text
            assert threads and threading.current_thread() not in threads  # the loop runs here: streams go on

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


# --- Migration (app.migration): fake vLLM engines that generate a deterministic sequence and die mid-answer. ---

def next_token(sequence: list[int]) -> int:
    """Greedy decoding of the fake model: the next token depends on the whole sequence (prompt + generated)."""
    return (sum(sequence) * 31 + len(sequence)) % 97 + 3


class FakeVLLM:
    """One vLLM replica's generate routes as vLLM 0.32 streams them (compact JSON, `token_ids` null unless asked,
    `kv_transfer_params.prompt_token_ids` as a chat prompt); `die` = (mode, after n tokens) ends its answers early:
    `reset` (connection cut), `eof` (stream ends without [DONE]), `error` (an engine error event), `500`."""

    def __init__(self, created: int, die: tuple[str, int] | None = None, chat_from_ids: bool = True):
        self.created, self.die, self.bodies = created, die, []
        self.chat_from_ids = chat_from_ids  # False: like vLLM 0.26, kv_transfer_params.prompt_token_ids is ignored
        app = web.Application()
        for route in (CHAT, "/v1/completions"):
            app.router.add_post(route, self.generate)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_get("/metrics", lambda r: web.Response(text=""))
        self.runner = web.AppRunner(app)

    start = FakeEngine.start

    async def tokenize(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        if self.die:
            request.transport.close()
        return web.json_response({"tokens": [1, 2]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        chat = request.path == CHAT
        prompt = self.chat_from_ids and (body.get("kv_transfer_params") or {}).get("prompt_token_ids") or (
            list(body["messages"][-1]["content"].encode()) if chat else
            body["prompt"] if isinstance(body["prompt"], list) else list(body["prompt"].encode()))
        count = body.get("max_completion_tokens") or body["max_tokens"]
        tokens = []
        for _ in range(count):
            tokens.append(next_token(prompt + tokens))
        die_at = self.die[1] if self.die else None
        if self.die and self.die[0] == "500":
            return web.json_response({"error": {"message": "EngineDeadError", "code": 500}}, status=500)
        rid = request.headers["x-request-id"]
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "object": "chat.completion.chunk" if chat else
                "text_completion", "created": self.created, "model": body["model"]}
        ids = body.get("return_token_ids")
        usage = {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + count, "completion_tokens": count}
        if not body.get("stream"):
            if self.die:
                request.transport.close()
                return web.Response()
            text = "".join(f"t{t} " for t in tokens)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else \
                {"index": 0, "text": text}
            return web.json_response({**head, "choices": [{**choice, "finish_reason": "length",
                                                           "token_ids": tokens if ids else None}], "usage": usage})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        async def send(chunk):
            await response.write(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")

        if chat:
            await send({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}],
                        "prompt_token_ids": prompt if ids else None})
        offset = 0
        for i, token in enumerate(tokens):
            if i == die_at:
                if self.die[0] == "reset":
                    await response.write(b'data: {"id":"half an ev')
                    request.transport.close()
                elif self.die[0] == "error":
                    await response.write(b'data: {"error": {"message": "EngineDeadError", "code": 500}}\n\n'
                                         b"data: [DONE]\n\n")
                return response
            text = f"t{token} "
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            logprobs = None
            if body.get("logprobs"):
                logprobs = {"content": [{"token": text, "logprob": -1.0}]} if chat else \
                    {"text_offset": [offset], "token_logprobs": [-1.0], "tokens": [text], "top_logprobs": None}
            offset += len(text)
            if not chat:  # vLLM sets it on every chunk: null but on the first with return_token_ids
                choice["prompt_token_ids"] = prompt if ids and i == 0 else None
            finish = "length" if i == count - 1 else None
            await send({**head, "choices": [{**choice, "logprobs": logprobs, "finish_reason": finish,
                                             "token_ids": [token] if ids else None}]})
        if die_at == count:  # every token sent, the end lost
            request.transport.close()
            return response
        if (body.get("stream_options") or {}).get("include_usage"):
            await send({**head, "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        return response


def events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n") and text.count("[DONE]") == 1, text
    return [json.loads(e[6:]) for e in text.split("\n\n")[:-2]]


def generate(route: str = CHAT, stream: bool = True, **extra) -> dict:
    body = {"model": "m", "max_tokens": 8, "stream": stream, "stream_options": {"include_usage": True}} if stream \
        else {"model": "m", "max_tokens": 8}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if route == CHAT else {"prompt": "hello"}
    return body | extra


async def answer(engines: dict, route: str, body: dict, app_config: AppConfig | None = None):
    async with router(engines, app_config) as client:
        r = await client.post(route, json=body, headers={"x-request-id": "req1"})
        return r, client


def reference(route: str, body: dict):
    """The same request answered by one replica that does not fail."""
    return asyncio.run(answer({"ok": FakeVLLM(created=1)}, route, body))[0]


@pytest.mark.parametrize("route", [CHAT, "/v1/completions"])
@pytest.mark.parametrize("mode", ["reset", "eof", "error"])
def test_a_stream_whose_replica_dies_continues_on_another_replica(route, mode, caplog):
    body = generate(route, logprobs=True) if route == CHAT else generate(route, logprobs=1)
    expected = events(reference(route, body).text)
    dying, healthy = FakeVLLM(created=1, die=(mode, 3)), FakeVLLM(created=2)
    r, client = asyncio.run(answer({"a": dying, "b": healthy}, route, body))
    got = events(r.text)
    assert got == expected  # the same id, created, role chunk, text, logprobs (offsets), token_ids null, usage
    assert len(dying.bodies) == 1 and len(healthy.bodies) == 1 and dying.bodies[0]["return_token_ids"] is True
    continued = healthy.bodies[0]
    prompt = list(b"hi" if route == CHAT else b"hello")
    carried = continued["kv_transfer_params"]["prompt_token_ids"] if route == CHAT else continued["prompt"]
    assert carried[:len(prompt)] == prompt and len(carried) == len(prompt) + 3 and continued["max_tokens"] == 5
    assert "migrations" in caplog.text and '"from": "a", "to": "b", "tokens": 3' in caplog.text


@pytest.mark.parametrize("route", [CHAT, "/v1/completions"])
def test_a_non_streaming_request_whose_replica_dies_is_answered_whole_by_another(route):
    expected = reference(route, generate(route, stream=False)).json()
    for mode in ("reset", "500"):
        dying, healthy = FakeVLLM(created=1, die=(mode, 3)), FakeVLLM(created=1)
        r, _ = asyncio.run(answer({"a": dying, "b": healthy}, route, generate(route, stream=False)))
        assert r.status_code == 200 and r.json() == expected
        assert "return_token_ids" not in healthy.bodies[0]  # sent again from the start, unchanged


def test_a_stream_moves_as_often_as_its_replicas_die_within_the_limit():
    body = generate(max_tokens=9, logprobs=True)
    expected = events(reference(CHAT, body).text)
    engines = {"a": FakeVLLM(1, die=("reset", 2)), "b": FakeVLLM(2, die=("error", 3)), "c": FakeVLLM(3)}
    r, _ = asyncio.run(answer(engines, CHAT, body))
    assert events(r.text) == expected
    assert [e.bodies[0]["max_tokens"] for e in engines.values()] == [9, 7, 4]


def test_a_chat_stream_that_a_replica_cannot_continue_from_ids_ends_with_one_error_not_a_second_answer():
    expected = events(reference(CHAT, generate()).text)
    engines = {"a": FakeVLLM(1, die=("reset", 3)), "b": FakeVLLM(2, chat_from_ids=False)}
    r, _ = asyncio.run(answer(engines, CHAT, generate()))
    got = events(r.text)
    assert "error" in got[-1] and "cannot continue" in got[-1]["error"]["message"]
    assert got[:-1] == expected[:4]  # the role chunk and the 3 tokens before the failure, nothing again


def test_a_stream_that_lost_only_its_end_gets_its_usage_and_done():
    expected = events(reference(CHAT, generate()).text)
    r, _ = asyncio.run(answer({"a": FakeVLLM(1, die=("reset", 8)), "b": FakeVLLM(2)}, CHAT, generate()))
    assert events(r.text) == expected


def test_a_client_asking_for_token_ids_gets_them_across_the_migration():
    body = generate(return_token_ids=True)
    expected = events(reference(CHAT, body).text)
    r, _ = asyncio.run(answer({"a": FakeVLLM(1, die=("reset", 4)), "b": FakeVLLM(2)}, CHAT, body))
    got = events(r.text)
    assert got == expected and got[0]["prompt_token_ids"] == list(b"hi") and got[5]["choices"][0]["token_ids"]


def test_the_migration_limit_bounds_the_hand_overs_then_the_stream_ends_with_one_error():
    engines = {name: FakeVLLM(1, die=("reset", 2)) for name in "abc"}
    app_config = AppConfig.model_validate({"models": [
        {"name": "m", "source": "x", "backend": "cpu", "migration_limit": 1},
        {"name": "e", "source": "y", "backend": "cpu", "task": "embed"}]})
    r, _ = asyncio.run(answer(engines, CHAT, generate(), app_config))
    got = events(r.text)
    assert "error" in got[-1] and not any("error" in e for e in got[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in got[:-1]) == "".join(
        f"t{t} " for t in _greedy(list(b"hi"), 4))  # 2 tokens per replica, two replicas
    assert sum(len(e.bodies) for e in engines.values()) == 2


def _greedy(prompt: list[int], count: int) -> list[int]:
    tokens = []
    for _ in range(count):
        tokens.append(next_token(prompt + tokens))
    return tokens


def test_no_replica_left_ends_a_stream_with_an_error_event_and_a_json_request_with_json(monkeypatch):
    monkeypatch.setattr(migration, "WAIT_S", 0.2)

    def dying():
        return {"a": FakeVLLM(1, die=("reset", 2)), "b": FakeVLLM(1, die=("reset", 2))}

    r, _ = asyncio.run(answer(dying(), CHAT, generate()))
    got = events(r.text)
    assert got[-1]["error"]["code"] in (500, 503) and not any("error" in e for e in got[:-1])
    r, _ = asyncio.run(answer(dying(), CHAT, generate(stream=False)))
    assert r.status_code in (500, 503) and r.headers["content-type"] == "application/json"
    assert "data:" not in r.text and r.json()["error"]["message"]


def test_an_idempotent_request_is_retried_once_on_another_replica():
    dying, healthy = FakeVLLM(1, die=("reset", 0)), FakeVLLM(1)
    r, client = asyncio.run(answer({"a": dying, "b": healthy}, "/tokenize", {"model": "m", "prompt": "x"}))
    assert r.status_code == 200 and r.json() == {"tokens": [1, 2]}
    assert len(dying.bodies) + len(healthy.bodies) in (1, 2) and len(healthy.bodies) == 1


def test_migration_limit_0_sends_nothing_twice():
    from app import migration

    assert [migration.attempts(route, 0) for route in (CHAT, "/tokenize", "/v1/load_lora_adapter")] == [0, 0, 0]
    assert [migration.attempts(route, 3) for route in (CHAT, "/tokenize", "/v1/load_lora_adapter")] == [3, 1, 0]


def test_migrations_are_counted():
    async def main():
        async with router({"a": FakeVLLM(1, die=("reset", 3)), "b": FakeVLLM(2)}) as client:
            await client.post(CHAT, json=generate())
            text = (await client.get("/metrics")).text
            assert 'llm_ingress_migrations_total{model="m"} 1.0' in text

    run(main())


@pytest.mark.parametrize("change,continued", [
    ({}, True), ({"n": 2}, False), ({"echo": True}, False), ({"response_format": {"type": "json_object"}}, False),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, True),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, False),
    ({"stream": False}, False)])
def test_which_chat_streams_can_be_continued(change, continued):
    assert migration.continuable(CHAT, generate(**change)) is continued
