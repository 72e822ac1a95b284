"""Prefix-aware routing on a real app with two tiny-chat replicas (serve_configs/cpu-2replicas.yaml): requests that
share a long prefix land on one replica (whose vLLM prefix cache then hits), distinct prefixes spread over both."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, running, serve_run


pytestmark = pytest.mark.integration

SHARED = "You are a careful assistant who answers in one short sentence. " * 16  # ~1,000 characters


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    with running(serve_run(ROOT / "serve_configs" / "cpu-2replicas.yaml", tmp_path_factory.mktemp("two"))) as app:
        wait_for(lambda: len(prefix_cache_hits(app.url)) == 2, 600, "both replicas to serve")
        yield app


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def prefix_cache_hits(url: str) -> dict[str, float]:
    """replica id -> vLLM's prefix-cache hit counter (tokens), for every replica in the app's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    return {s.labels["replica"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "vllm:prefix_cache_hits" for s in family.samples if s.name.endswith("_total")}


def served_by(url: str, system: str, question: str) -> str:
    request = {"model": "tiny-chat", "max_tokens": 2,
               "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    response = httpx.post(f"{url}/v1/chat/completions", json=request, timeout=300)
    assert response.status_code == 200, response.text
    return response.headers["x-served-by-replica"]


def test_a_shared_prefix_sticks_to_one_replica_and_hits_its_cache(two_replicas):
    url = two_replicas.url
    before = prefix_cache_hits(url)
    owners = {served_by(url, SHARED, f"Question {i}?") for i in range(6)}
    assert len(owners) == 1, owners
    owner = owners.pop()
    wait_for(lambda: prefix_cache_hits(url)[owner] > before[owner], 60, "the owner's prefix cache to hit")


def test_distinct_prefixes_spread_over_both_replicas(two_replicas):
    systems = [f"Persona {i}: " + f"you speak only about topic number {i}. " * 25 for i in range(8)]
    replicas = [served_by(two_replicas.url, system, "Hello?") for system in systems]
    assert set(replicas) == set(prefix_cache_hits(two_replicas.url)), replicas
    # ...and each keeps its replica
    assert [served_by(two_replicas.url, system, "Again?") for system in systems] == replicas
