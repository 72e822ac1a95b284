"""Multi-LoRA on the real app: a config-listed adapter, adapters loaded and unloaded at run time on every replica,
and greedy output equal to `vllm serve --enable-lora --lora-modules` on the same files.

The app's two tiny-chat replicas route by prompt prefix, so the same app (one start fewer) also shows prefix-aware
routing: requests that share a long prefix land on one replica, whose vLLM prefix cache then hits; distinct prefixes
spread over both."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import httpx
import pytest
from openai import AsyncOpenAI, NotFoundError, OpenAI

from conftest import engine_metric_by_replica, import_script, running, wait_for
from two_replicas.conftest import ADAPTER, ADAPTER_PATH, BASE, BASE_PATH

# The app with two replicas and vllm serve start within the module: slow on a busy 2-core machine.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

RUNTIME = "tiny-lora-2"
PROMPTS = ["The weather today", "def main():"]
REPLICA_HEADER = "x-served-by-replica"
SHARED = "You are a careful assistant who answers in one short sentence. " * 16  # ~1,000 characters


def greedy(client: OpenAI, model: str, prompt: str) -> tuple[str, list[str], list[float]]:
    choice = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, logprobs=1,
                                       extra_body={"ignore_eos": True}).choices[0]
    return choice.text, choice.logprobs.tokens, choice.logprobs.token_logprobs


def openai_client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(vllm_serve_with_adapter) -> dict[tuple[str, str], tuple]:
    """Greedy answers of `vllm serve` with the config's adapter (started beside the package's app)."""
    with running(vllm_serve_with_adapter) as server:
        client = openai_client(server.url)
        return {(model, p): greedy(client, model, p) for model in (BASE, ADAPTER) for p in PROMPTS}


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("lora") / "tiny-chat-lora-2"
    assert import_script("make_tiny_lora").main(["--base", str(BASE_PATH), "--out", str(out), "--seed", "1"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def client(app) -> OpenAI:
    return openai_client(app.url)


def served_by(app, model: str, requests: int = 8) -> list[tuple[int, str | None, int | None]]:
    """(status, replica, tokens generated) of concurrent greedy requests, each beginning with a prefix of its own
    (prefix-aware routing sends a prompt that shares a prefix with an earlier one back to that one's replica)."""
    async def run():
        client = AsyncOpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=120)

        async def one(i):
            try:
                raw = await client.completions.with_raw_response.create(
                    model=model, prompt=f"{uuid.uuid4().hex} {PROMPTS[0]}", max_tokens=16, temperature=0,
                    extra_body={"ignore_eos": True})
            except Exception as e:  # noqa: BLE001 - a replica killed mid-request; the caller waits for the condition
                return getattr(e, "status_code", 0), None, None
            return raw.status_code, raw.headers.get(REPLICA_HEADER), raw.parse().usage.completion_tokens

        async with client:
            return await asyncio.gather(*(one(i) for i in range(requests)))

    return asyncio.run(run())


def both_replicas_answer(app, model: str) -> set[str] | None:
    """The replicas that answered `model`, once two different ones did and none refused it."""
    answers = served_by(app, model)
    ok = all(status == 200 and tokens == 16 for status, _, tokens in answers)  # (a random adapter's text may be '')
    replicas = {replica for _, replica, _ in answers}
    return replicas if ok and len(replicas) >= 2 else None


def load(app, body: dict) -> httpx.Response:
    return httpx.post(f"{app.url}/v1/load_lora_adapter", json=body, timeout=300)


def unload(app, body: dict) -> httpx.Response:
    return httpx.post(f"{app.url}/v1/unload_lora_adapter", json=body, timeout=300)


def prefix_cache_hits(url: str) -> dict[str, float]:
    """replica id -> vLLM's prefix-cache hit counter (tokens), for every replica in the app's /metrics."""
    return engine_metric_by_replica(url, "vllm:prefix_cache_hits_total")


def replica_for(url: str, system: str, question: str) -> str:
    request = {"model": BASE, "max_tokens": 2,
               "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    response = httpx.post(f"{url}/v1/chat/completions", json=request, timeout=300)
    assert response.status_code == 200, response.text
    return response.headers[REPLICA_HEADER]


@pytest.fixture(scope="module")
def both_serving(app):
    wait_for(lambda: len(prefix_cache_hits(app.url)) == 2, 600, "both replicas to serve")
    return app


def test_a_shared_prefix_sticks_to_one_replica_and_hits_its_cache(both_serving):
    url = both_serving.url
    before = prefix_cache_hits(url)
    owners = {replica_for(url, SHARED, f"Question {i}?") for i in range(6)}
    assert len(owners) == 1, owners
    owner = owners.pop()
    wait_for(lambda: prefix_cache_hits(url)[owner] > before[owner], 60, "the owner's prefix cache to hit")


def test_distinct_prefixes_spread_over_both_replicas(both_serving):
    url = both_serving.url
    systems = [f"Persona {i}: " + f"you speak only about topic number {i}. " * 25 for i in range(8)]
    replicas = [replica_for(url, system, "Hello?") for system in systems]
    assert set(replicas) == set(prefix_cache_hits(url)), replicas
    # ...and each keeps its replica
    assert [replica_for(url, system, "Again?") for system in systems] == replicas


def test_models_list_the_adapter_with_its_parent(client):
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert cards[ADAPTER]["parent"] == BASE and cards[ADAPTER]["root"] == "models/tiny-chat-lora"
    assert cards[BASE]["parent"] is None


def test_adapter_output_differs_from_the_base_and_equals_vllm_serve(client, reference):
    for prompt in PROMPTS:
        base, adapted = greedy(client, BASE, prompt), greedy(client, ADAPTER, prompt)
        assert adapted[0] != base[0]
        for model, ours in ((BASE, base), (ADAPTER, adapted)):
            text, tokens, logprobs = reference[(model, prompt)]
            assert (ours[0], ours[1]) == (text, tokens), model
            assert ours[2] == pytest.approx(logprobs, abs=1e-4), model


def test_a_runtime_adapter_reaches_every_replica_also_a_new_one(app, client, second_adapter):
    wait_for(lambda: both_replicas_answer(app, BASE), 900, "both replicas of the base model")
    r = load(app, {"lora_name": RUNTIME, "lora_path": second_adapter})
    assert r.status_code == 200, r.text
    cards = {m.id: m for m in client.models.list().data}
    assert cards[RUNTIME].model_dump()["parent"] == BASE and cards[RUNTIME].model_dump()["root"] == second_adapter

    text = greedy(client, RUNTIME, PROMPTS[0])[0]
    assert text not in (greedy(client, BASE, PROMPTS[0])[0], greedy(client, ADAPTER, PROMPTS[0])[0])
    before = wait_for(lambda: both_replicas_answer(app, RUNTIME), 900, "the adapter on both replicas")

    victim = sorted(app.descendant_pids(f"ServeReplica:llm:{BASE}"))[0]
    os.kill(victim, signal.SIGKILL)  # Serve replaces it; the new replica loads the adapter before it is routable
    after = wait_for(lambda: (r := both_replicas_answer(app, RUNTIME)) and r - before, 900,
                     "a replacement replica answering with the run-time adapter")
    assert after


def test_unload_removes_the_adapter(app, client, second_adapter):
    if RUNTIME not in {m.id for m in client.models.list().data}:
        assert load(app, {"lora_name": RUNTIME, "lora_path": second_adapter}).status_code == 200
    r = unload(app, {"lora_name": RUNTIME})
    assert r.status_code == 200, r.text
    assert RUNTIME not in {m.id for m in client.models.list().data}
    with pytest.raises(NotFoundError):
        greedy(client, RUNTIME, PROMPTS[0])
    assert unload(app, {"lora_name": RUNTIME}).status_code == 404  # vLLM's: no replica has it


def test_a_bad_path_gets_vllms_error_and_the_app_keeps_serving(app, client):
    r = load(app, {"lora_name": "broken", "lora_path": "/nonexistent/lora"})
    assert 400 <= r.status_code < 500
    error = r.json()["error"]
    assert error["code"] == r.status_code and "/nonexistent/lora" in error["message"]
    assert "broken" not in {m.id for m in client.models.list().data}
    assert greedy(client, ADAPTER, PROMPTS[0])[0] and greedy(client, BASE, PROMPTS[0])[0]


def test_load_refusals_are_clear(app):
    r = load(app, {"lora_name": ADAPTER, "lora_path": str(ADAPTER_PATH)})
    assert r.status_code == 400 and "listed in the app's config" in r.json()["error"]["message"]
    r = load(app, {"lora_name": BASE, "lora_path": str(ADAPTER_PATH)})
    assert r.status_code == 400 and "conflicts with a served base model" in r.json()["error"]["message"]
    r = load(app, {"lora_name": "x", "lora_path": str(ADAPTER_PATH), "model": "no-such-model"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert load(app, {"lora_name": "x"}).status_code == 400
    assert unload(app, {"lora_name": ADAPTER}).status_code == 400
