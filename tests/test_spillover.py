"""Spillover on a real app: a busy model's overflow goes to its opted-in fallback, and nowhere without opt-in."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import ROOT, running, serve_run

pytestmark = pytest.mark.integration

BURST = 16
REQUEST = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64,
           "ignore_eos": True}


@pytest.fixture(scope="module")
def spill_app(tmp_path_factory):
    with running(serve_run(ROOT / "serve_configs" / "cpu-spillover.yaml", tmp_path_factory.mktemp("spill"))) as app:
        yield app


def burst(url: str, n: int = BURST) -> list[httpx.Response]:
    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=REQUEST) for _ in range(n)))

    return asyncio.run(run())


def test_burst_spills_to_fallback_and_none_fail(spill_app):
    responses = burst(spill_app.url)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    served_by = [r.headers["x-served-by"] for r in responses]
    assert served_by.count("tiny-chat-spill") > 0 and served_by.count("tiny-chat") > 0
    assert all(r.json()["model"] == r.headers["x-served-by"] for r in responses)
    metrics = httpx.get(f"{spill_app.url}/metrics").text
    assert 'llm_ingress_spillover_requests_total{fallback="tiny-chat-spill",model="tiny-chat"}' in metrics


def test_without_opt_in_nothing_spills(base_url):
    responses = burst(base_url)  # the default app: tiny-chat has no fallback
    assert all(r.status_code == 200 for r in responses)
    assert {r.headers["x-served-by"] for r in responses} == {"tiny-chat"}
