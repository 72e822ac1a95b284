"""Auth, limits, backpressure, request ids, a dead engine core and a forced stop, on a small real app. (A killed
engine replica: tests/two_replicas/test_migration.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time

import httpx
import psutil
import pytest

from conftest import ROOT, running, serve_run
from launch import must_not_outlive_its_app

pytestmark = pytest.mark.integration

KEY = "sk-test-7f3a9c"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    app = serve_run(ROOT / "tests" / "configs" / "guarded.yaml", tmp_path_factory.mktemp("guarded"),
                    env={"LLM_TEST_API_KEYS": f"other-key,{KEY}"})
    with running(app):
        yield app


def post(app, body, headers=AUTH, timeout=60):
    return httpx.post(f"{app.url}/v1/chat/completions", json=body, headers=headers, timeout=timeout)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_requests_without_a_valid_key_get_401(guarded, headers):
    r = post(guarded, CHAT, headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(f"{guarded.url}/v1/models", headers=headers).status_code == 401


def test_a_valid_key_is_served_and_health_needs_none(guarded):
    assert post(guarded, CHAT).status_code == 200
    assert httpx.get(f"{guarded.url}/health").status_code == 200


def test_keys_never_appear_in_logs(guarded):
    post(guarded, CHAT)
    post(guarded, CHAT, {"Authorization": "Bearer wrong"})
    assert KEY not in guarded.log_path.read_text(errors="replace")


def test_limits_refuse_with_the_limit_named(guarded):
    r = post(guarded, {**CHAT, "n": 5})
    assert r.status_code == 400 and "limits.max_n" in r.json()["error"]["message"]
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70000}]}
    r = post(guarded, big)
    assert r.status_code == 413 and "65536" in r.json()["error"]["message"]
    r = post(guarded, {**CHAT, "max_tokens": 5000})  # beyond the model's context: vLLM's own check
    assert r.status_code == 400


def test_request_id_is_returned_and_logged(guarded):
    r = post(guarded, CHAT, {**AUTH, "X-Request-Id": "trace-me-42"})
    assert r.headers["x-request-id"] == "trace-me-42"
    assert len(post(guarded, CHAT).headers["x-request-id"]) >= 16  # made when the client sends none
    deadline = time.monotonic() + 10
    while "trace-me-42" not in guarded.log_path.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert '"request_id": "trace-me-42"' in guarded.log_path.read_text(errors="replace")


def test_overload_gets_503_with_retry_after_and_the_rest_succeed(guarded):
    body = {**CHAT, "max_tokens": 600, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=guarded.url, headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(16)))

    results = asyncio.run(run())
    refused = [r for r in results if r.status_code == 503]
    served = [r for r in results if r.status_code == 200]
    assert len(refused) + len(served) == 16, [r.text for r in results]
    assert refused and served
    # Refused because the queue was full (the router's own words), not after timing out in it.
    messages = [r.json()["error"]["message"] for r in refused]
    assert all("request(s) waiting (max_queued_requests)" in m and "No slot came free" not in m for m in messages)
    assert all(r.headers["retry-after"] and r.json()["error"]["type"] == "ServiceUnavailableError" for r in refused)


def test_dead_engine_core_fails_requests_cleanly_and_the_replica_is_replaced(guarded):
    """The engine core (vLLM's own process, e.g. OOM-killed) dies while the replica lives on."""
    replica = guarded.descendant_pids("ServeReplica:llm:tiny-chat")
    core = guarded.descendant_pids("VLLM::EngineCore")
    assert replica and core
    subprocess.run(["kill", "-9", *map(str, core)])
    r = post(guarded, CHAT)
    assert r.status_code >= 500 and r.json()["error"]["message"]  # vLLM's own error, not a hang
    assert_recovers_with_a_new_replica(guarded, replica)  # the health check fails and Serve replaces it


def test_a_forced_stop_leaves_no_engine_process(guarded):
    """`ray stop --force` SIGKILLs every Ray process; vLLM's processes must follow. Done last, to this module's app
    and its process tree only, so that the other apps of the test session live on."""
    tree = psutil.Process(guarded.process.pid).children(recursive=True)
    engines = [p for p in tree if is_engine_process(p)]
    assert any("haproxy" in " ".join(p.cmdline()) for p in engines) and len(engines) >= 3
    for proc in tree:
        if proc not in engines:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
    guarded.process.kill()
    _, alive = psutil.wait_procs(engines, timeout=30)
    assert not alive, alive


def is_engine_process(proc: psutil.Process) -> bool:
    """vLLM's engine processes, and HAProxy (started by Ray, it must die with Ray too)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return must_not_outlive_its_app(proc.name(), " ".join(proc.cmdline()))
    return False


def assert_recovers_with_a_new_replica(app, old_pids: set[int], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if post(app, CHAT, timeout=30).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(3)
    assert post(app, CHAT).status_code == 200
    now = app.descendant_pids("ServeReplica:llm:tiny-chat")
    assert now and not (now & old_pids)  # Serve replaced it
