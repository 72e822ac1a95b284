"""The OpenAI routes of the real app (Ray Serve + vLLM CPU engines), driven with the `openai` client."""

from __future__ import annotations

import ast
import asyncio
import base64
import json
import math
import os
import re
import struct

import httpx
import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.integration

CHAT = "tiny-chat"
EMBED = "all-MiniLM-L6-v2"
HELLO = [{"role": "user", "content": "Say hello."}]


def test_models_lists_both_with_backend_and_context(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {CHAT, EMBED}
    chat = models[CHAT].model_dump()
    assert chat["backend"] == "cpu" and chat["task"] == "generate" and chat["max_model_len"] == 2048
    assert models[EMBED].model_dump()["task"] == "embed"


def test_chat_completion(client):
    r = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=12, extra_body={"ignore_eos": True})
    assert r.model == CHAT and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0


def test_completion_with_batch_prompts(client):
    r = client.completions.create(model=CHAT, prompt=["one two", "three four", "five"], max_tokens=5,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 3 * 5


def test_n_choices(client):
    r = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=6, n=3, temperature=1.0, seed=1,
                                       extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 3 * 6


def test_greedy_is_deterministic(client):
    texts = {
        client.completions.create(model=CHAT, prompt="The weather today", max_tokens=16, temperature=0).choices[0].text
        for _ in range(3)
    }
    assert len(texts) == 1


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        return client.completions.create(
            model=CHAT, prompt="Once upon", max_tokens=16, temperature=1.0, seed=seed
        ).choices[0].text

    assert sample(42) == sample(42)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_stop_string_ends_generation(client):
    free = client.completions.create(model=CHAT, prompt="a b c", max_tokens=24, temperature=0).choices[0].text
    stop = free.strip()[:2] or free[:2]  # the random model's greedy text is now and then all whitespace
    assert stop, "the model produced nothing to stop on"
    r = client.completions.create(model=CHAT, prompt="a b c", max_tokens=24, temperature=0, stop=[stop])
    assert stop not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def test_logprobs(client):
    chat = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=4, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    comp = client.completions.create(model=CHAT, prompt="hi", max_tokens=3, logprobs=2)
    assert len(comp.choices[0].logprobs.tokens) == 3


def test_vllm_extra_sampling_parameters(client):
    r = client.completions.create(
        model=CHAT, prompt="x", max_tokens=20, extra_body={"ignore_eos": True, "top_k": 5, "min_tokens": 20}
    )
    assert r.usage.completion_tokens == 20


def test_streaming_chat_with_usage(client):
    stream = client.chat.completions.create(
        model=CHAT, messages=HELLO, max_tokens=10, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 10
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)


def test_streaming_completion_ends_with_done(base_url):
    body = {"model": CHAT, "prompt": "hello", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_make_sense(client):
    sentences = ["I like to eat pizza for dinner.", "She enjoys eating pasta at night.",
                 "The stock market fell sharply."]
    r = client.embeddings.create(model=EMBED, input=sentences)
    vectors = [d.embedding for d in r.data]
    assert len(vectors) == 3 and len(vectors[0]) == 384
    related, unrelated = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert related > unrelated + 0.3, (related, unrelated)


def test_embeddings_base64_matches_float(client):
    text = "An embedding, twice."
    floats = client.embeddings.create(model=EMBED, input=text, encoding_format="float").data[0].embedding
    raw = client.embeddings.with_raw_response.create(model=EMBED, input=text, encoding_format="base64")
    encoded = json.loads(raw.text)["data"][0]["embedding"]
    decoded = struct.unpack(f"<{len(floats)}f", base64.b64decode(encoded))
    assert max(abs(a - b) for a, b in zip(decoded, floats)) < 1e-5


def test_tokenize_detokenize_round_trip(base_url):
    tokens = httpx.post(f"{base_url}/tokenize", json={"model": CHAT, "prompt": "hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 2048
    text = httpx.post(f"{base_url}/detokenize", json={"model": CHAT, "tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "hello world"


def test_health_and_version(base_url):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    version = httpx.get(f"{base_url}/version").json()
    assert version["vllm"] == "0.32.0" and version["ray"]


def test_metrics_include_engine_and_ingress_series(client, base_url):
    client.completions.create(model=CHAT, prompt="count me", max_tokens=2)
    text = httpx.get(f"{base_url}/metrics").text
    assert f'vllm:num_requests_running{{engine="0",model_name="{CHAT}"' in text
    assert "vllm:prompt_tokens_total" in text or "vllm:prompt_tokens" in text
    assert f'llm_ingress_requests_total{{model="{CHAT}",route="/v1/completions",status="200"}}' in text


def test_32_concurrent_requests_each_get_their_own_answer(client, aclient_factory):
    sentences = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(
        ["pizza", "rain", "stocks", "cats", "trains", "music", "the sea", "chess"])]
    alone = [d.embedding for d in client.embeddings.create(model=EMBED, input=sentences).data]

    async def chat(client, i) -> tuple[str, int]:
        args = {"model": CHAT, "messages": HELLO, "max_tokens": 16, "extra_body": {"ignore_eos": True}}
        if i % 2:
            r = await client.chat.completions.create(**args)
            return r.choices[0].message.content, r.usage.completion_tokens
        stream = await client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens

    async def embed(client, sentence) -> list[float]:
        return (await client.embeddings.create(model=EMBED, input=sentence)).data[0].embedding

    async def run():
        client = aclient_factory()
        try:
            return await asyncio.gather(asyncio.gather(*(chat(client, i) for i in range(24))),
                                        asyncio.gather(*(embed(client, s) for s in sentences)))
        finally:
            await client.close()

    chats, vectors = asyncio.run(run())
    assert all(text and tokens == 16 for text, tokens in chats), chats
    # Each embedding is its own sentence's (as computed alone), not another request's.
    for i, vector in enumerate(vectors):
        similarities = [cosine(vector, other) for other in alone]
        assert max(similarities) == similarities[i] > 0.999, (i, similarities)


# Routes beyond the classic ones: the router forwards whatever vLLM's app serves for the model's task.
def test_responses_api(client):
    r = client.responses.create(model=CHAT, input="Say hello.", max_output_tokens=8)
    assert r.object == "response" and r.model == CHAT and r.output_text is not None
    assert r.usage.output_tokens > 0


def test_responses_api_streaming(client):
    events = list(client.responses.create(model=CHAT, input="Say hello.", max_output_tokens=8, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds


QUERY = "What do people eat for dinner?"
DOCUMENTS = ["The stock market fell sharply today.", "Many families eat pasta or pizza for dinner."]


def test_score_ranks_the_relevant_text_first(base_url):
    r = httpx.post(f"{base_url}/v1/score", json={"model": EMBED, "text_1": QUERY, "text_2": DOCUMENTS}, timeout=60)
    assert r.status_code == 200, r.text
    scores = [d["score"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
    assert scores[1] > scores[0] + 0.2, scores


def test_rerank_orders_by_relevance(base_url):
    r = httpx.post(f"{base_url}/rerank", json={"model": EMBED, "query": QUERY, "documents": DOCUMENTS}, timeout=60)
    assert r.status_code == 200, r.text
    assert [d["index"] for d in r.json()["results"]] == [1, 0]


def test_a_route_the_models_task_lacks_is_refused_with_the_models_that_serve_it(base_url):
    r = httpx.post(f"{base_url}/v1/score", json={"model": CHAT, "text_1": QUERY, "text_2": DOCUMENTS}, timeout=60)
    assert r.status_code == 400 and EMBED in r.json()["error"]["message"]
    r = httpx.post(f"{base_url}/v1/audio/transcriptions", json={"model": CHAT}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"


def engine_tasks(serve_log: str) -> dict[str, list[str]]:
    """model -> the tasks its vLLM engine reported at start (each replica logs them when ready; `serve run` shows
    its replicas' logs)."""
    found = re.findall(r"model (\S+): ready at \S+ \(tasks (\[[^\]]*\])", serve_log)
    return {name: ast.literal_eval(tasks) for name, tasks in found}


def refused_by_router(base_url: str, model: str, route: str) -> bool:
    """Whether the router refuses POST `route` for `model` itself (rather than passing it to the model's vLLM app,
    which may well answer 4xx to a body of just the model's name)."""
    r = httpx.post(f"{base_url}{route}", json={"model": model}, timeout=60)
    message = r.json().get("error", {}).get("message", "") if r.status_code in (400, 404) else ""
    return "does not serve" in message or "No model serves" in message


def test_routes_are_exactly_vllms(base_url, request):
    """Each model is offered exactly the POST routes vLLM's own app registers for the tasks its engine reported:
    vLLM's app built here, in the test, is the reference."""
    if os.environ.get("APP_URL"):
        pytest.skip("reads the engines' tasks from the output of the app's `serve run`")
    app = request.getfixturevalue("cpu_app")
    from app import vllm_api
    from app.config import AppConfig
    from app.engine import vllm_routes

    config = AppConfig.model_validate(
        yaml.safe_load((ROOT / "serve_configs" / "cpu.yaml").read_text())["applications"][0]["args"])
    tasks = engine_tasks(app.log_path.read_text(errors="replace"))
    assert set(tasks) == {CHAT, EMBED}, tasks
    routes = {}
    for name, model_tasks in tasks.items():
        args = vllm_api.server_args(config.model(name).resolved_source(), name, {})
        model_config = vllm_api.engine_args_from(args).create_model_config()
        routes[name] = {re.sub(r"{[^}]+}", "x", r) for r in vllm_routes(vllm_api.build_app(args, tuple(model_tasks),
                                                                                           model_config))}
    assert "/v1/chat/completions" in routes[CHAT] and "/v1/embeddings" in routes[EMBED], routes
    every = set().union(*routes.values())
    for name, own in routes.items():
        refused = {route for route in every if refused_by_router(app.url, name, route)}
        assert refused == every - own, (name, sorted(refused ^ (every - own)))
