"""Serve's control plane on the direct path, on the real app: autoscaling on the engines' load, the engine's
max_ongoing_requests across two routers, and a killed replica leaving the routers' tables."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import pytest

from conftest import ROOT, running, running_by_replica, serve_run

pytestmark = pytest.mark.integration

MAX_ONGOING = 3  # tests/configs/autoscale.yaml
STREAMS = 12


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running(serve_run(ROOT / "tests" / "configs" / "autoscale.yaml", tmp_path_factory.mktemp("scale"))) as app:
        yield app


async def stream_until(url: str, stop: asyncio.Event, served_by: list[str], failures: list[str]) -> None:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "count"}], "max_tokens": 128,
            "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=300) as client:
        while not stop.is_set():
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                text = (await r.aread()).decode()
                if r.status_code != 200 or not text.rstrip().endswith("data: [DONE]"):
                    failures.append(f"{r.status_code} {text[-200:]}")
                served_by.append(r.headers.get("x-served-by-replica", "?"))


@pytest.mark.timeout(600)
def test_scales_up_under_streams_with_the_limit_held_across_routers_then_down(app):
    async def main():
        stop, served_by, failures, peaks = asyncio.Event(), [], [], {}
        workers = [asyncio.create_task(stream_until(app.url, stop, served_by, failures)) for _ in range(STREAMS)]
        started = time.monotonic()
        try:
            while time.monotonic() - started < 400:
                for rid, running_now in (await asyncio.to_thread(running_by_replica, app.url)).items():
                    peaks[rid] = max(peaks.get(rid, 0.0), running_now)
                if len(set(served_by)) >= 2 and served_by[-STREAMS:].count(served_by[-1]) < STREAMS:
                    break  # a second replica came up and serves
                await asyncio.sleep(1)
            scaled_after = time.monotonic() - started
        finally:
            stop.set()
            await asyncio.gather(*workers)
        return served_by, failures, peaks, scaled_after

    served_by, failures, peaks, scaled_after = asyncio.run(main())
    print(f"second replica serving after {scaled_after:.0f} s; engine peaks {peaks}; {len(served_by)} requests")
    assert not failures, failures[:3]
    assert len(set(served_by)) == 2, set(served_by)  # scaled to max_replicas, both serve
    # 12 streams over 2 routers: each router alone may send 3 per replica; the engine admits 3 in all.
    assert peaks and max(peaks.values()) <= MAX_ONGOING, peaks
    # The load did reach the limit: a replica refused requests as full. (Not from the gauge: on a loaded machine the
    # engine answers /metrics mostly while it is idle, so the reads missed every peak in one run.)
    assert full_refusals(app.url) > 0
    deadline = time.monotonic() + 240  # idle: downscale_delay_s 8, then a graceful stop
    while len(running_by_replica(app.url)) > 1 and time.monotonic() < deadline:
        time.sleep(2)
    assert len(running_by_replica(app.url)) == 1
    print(f"back to one replica {240 - (deadline - time.monotonic()):.0f} s after the load stopped")


def full_refusals(url: str, asks: int = 6) -> float:
    """The most `full` refusals (app.admission) that a router answering counted; HAProxy spreads the asks over both
    router replicas."""
    found = 0.0
    for _ in range(asks):
        text = httpx.get(f"{url}/metrics", timeout=60).text
        counted = re.search(r'^llm_ingress_engine_refusals_total{model="tiny-chat",reason="full"} (\S+)$', text, re.M)
        found = max(found, float(counted.group(1)) if counted else 0.0)
    return found


def routers_tables(url: str, asks: int = 6) -> list[set[str]]:
    """The replicas each answer lists; HAProxy spreads the asks over both router replicas."""
    return [set(running_by_replica(url)) for _ in range(asks)]


@pytest.mark.timeout(300)
def test_a_killed_replica_leaves_every_routers_table_within_5_s(app):
    before = set().union(*routers_tables(app.url))
    assert len(before) == 1, before
    # The replica scaled down before may still be stopping: kill the one that serves, once it is the only one.
    deadline = time.monotonic() + 120
    while len(pids := app.descendant_pids("ServeReplica:llm:tiny-chat")) != 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(pids) == 1, pids
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    while set().union(*routers_tables(app.url, 2)) & before and time.monotonic() - killed < 30:
        time.sleep(0.2)
    gone_after = time.monotonic() - killed
    print(f"killed replica out of the routers' tables after {gone_after:.1f} s")
    assert gone_after < 5
    assert not set().union(*routers_tables(app.url)) & before
    # That Serve then replaces the replica, and the new one serves, is test_reliability's (one engine start less).
