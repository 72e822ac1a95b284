"""Bad input gets an OpenAI error body with the right status; the app keeps serving; dropped clients abort work."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from conftest import engine_metric_by_replica, wait_running, wait_until

pytestmark = pytest.mark.integration

CHAT = "tiny-chat"
MSG = [{"role": "user", "content": "hi"}]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == status
    return error


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", {"model": CHAT, "messages": MSG, "max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {"model": CHAT, "messages": MSG, "temperature": -0.5}, "temperature"),
        ("/v1/chat/completions", {"model": CHAT, "messages": MSG, "max_tokens": "many"}, None),
        ("/v1/chat/completions", {"model": CHAT, "messages": "not a list"}, None),
        ("/v1/chat/completions", {"model": CHAT}, None),
        ("/v1/chat/completions", {"model": 7, "messages": MSG}, "model"),
        ("/v1/completions", {"model": CHAT, "prompt": "x", "n": "two"}, None),
        ("/v1/embeddings", {"model": CHAT, "input": "a chat model cannot embed"}, "model"),
        ("/v1/chat/completions", {"model": "all-MiniLM-L6-v2", "messages": MSG}, "model"),
    ],
)
def test_invalid_parameters_are_400(base_url, route, body, param):
    error = assert_openai_error(httpx.post(f"{base_url}{route}", json=body, timeout=30), 400)
    if param:
        assert param in (error["param"] or "") or param in error["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=MSG)
    assert "no-such-model" in e.value.message


def test_malformed_json_is_400(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", content=b'{"model": "tiny-chat", "messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert "JSON" in assert_openai_error(r, 400)["message"]


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=CHAT, prompt="word " * 3000, max_tokens=4)
    assert "context length" in e.value.message


def test_unknown_route_is_openai_404(base_url):
    assert_openai_error(httpx.get(f"{base_url}/v1/nothing-here"), 404)


GARBAGE = [
    b"\xff\xfe\x00garbage",
    b"[]",
    b"null",
    b'"a string"',
    b'{"model": "tiny-chat", "messages": [{"role": "robot", "content": 5}]}',
    b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": "x"}}',
    b'{"model": "tiny-chat", "prompt": [[1e30]], "max_tokens": 2}',
    b'{"model": "tiny-chat", "prompt": [99999999], "max_tokens": 2}',
    b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
    b"{" * 5000,
]


@pytest.mark.parametrize("body", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_gets_4xx_not_5xx(base_url, body):
    route = "/v1/completions" if b"prompt" in body else "/v1/chat/completions"
    r = httpx.post(f"{base_url}{route}", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    assert "error" in r.json()


def test_still_healthy_after_garbage(client, base_url):
    for body in GARBAGE:
        httpx.post(f"{base_url}/v1/chat/completions", content=body, timeout=30)
    assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200
    assert client.chat.completions.create(model=CHAT, messages=MSG, max_tokens=3).choices[0].message.content


# About a minute of engine work on 2 cores (64,000 tokens came in 17 s once), the most the app's max_total_tokens
# allows: only an abort ends it within ABORT_WITHIN_S. Each test drops its connection only once the engine has
# generated tokens for it; under this load the test client itself can be starved of CPU for seconds and one read of
# /metrics took 17 s, so no step relies on a short client-side timeout or on catching a gauge's value.
LONG = {"model": CHAT, "prompt": ["go", "went", "ran", "flew", "swam", "sang", "read", "wrote"], "max_tokens": 2000,
        "ignore_eos": True, "n": 16}
LONG_TOKENS = 8 * 16 * 2000
ABORT_WITHIN_S = 20


def generated_tokens(base_url: str) -> float:
    """The chat engine's own `vllm:generation_tokens_total` (NaN when the router's scrape of a busy engine timed
    out): a counter, so no moment of a request's life can be missed between two reads."""
    values = engine_metric_by_replica(base_url, "vllm:generation_tokens_total", CHAT).values()
    return sum(values) if values else float("nan")


def wait_generated(base_url: str, more_than: float) -> float:
    """The counter once it is above `more_than` (-inf: once the engine's scrape answers)."""
    return wait_until(lambda: generated_tokens(base_url), lambda v: v > more_than, 120, f"{CHAT} generated")


def assert_engine_stopped_the_request(base_url: str, before: float) -> None:
    """Once dropped, the request leaves the engine within ABORT_WITHIN_S, and no token is generated after that: fewer
    than the request asked for (a request that ran to its end generates exactly LONG_TOKENS)."""
    assert wait_running(base_url, CHAT, lambda v: v == 0, ABORT_WITHIN_S) == 0
    settled = generated_tokens(base_url)
    time.sleep(2)
    assert generated_tokens(base_url) == settled
    assert 0 < settled - before < LONG_TOKENS


def test_dropped_stream_aborts_engine_request(base_url):
    # The same batch shape once, briefly: on a fresh machine (no compile cache) the engine's first batch of this
    # size compiles for many seconds, during which no token flows and so nothing can notice the dropped client.
    warm = httpx.post(f"{base_url}/v1/completions", json={**LONG, "max_tokens": 4}, timeout=300)
    assert warm.status_code == 200, warm.text
    before = wait_generated(base_url, float("-inf"))
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        first = json.loads(next(r.iter_lines()).removeprefix("data: "))
        assert first["choices"][0]["text"] is not None, first  # a token: the engine runs the request
    # Closing the response drops the connection mid-stream.
    assert_engine_stopped_the_request(base_url, before)


def test_dropped_non_streaming_request_aborts_engine_request(base_url):
    before = wait_generated(base_url, float("-inf"))

    async def drop_once_generating() -> float:
        async with httpx.AsyncClient(timeout=120) as client:
            doomed = asyncio.create_task(client.post(f"{base_url}/v1/completions", json=LONG))
            generated = await asyncio.to_thread(wait_generated, base_url, before)
            doomed.cancel()  # the client gives up: its connection closes with the client
            return generated

    assert asyncio.run(drop_once_generating()) > before
    assert_engine_stopped_the_request(base_url, before)
