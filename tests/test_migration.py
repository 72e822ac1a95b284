"""Requests outlive their engine replica (`app.migration`), on the real app: two replicas of the tiny chat model,
the one serving a greedy request SIGKILLed halfway; the client's answer is that of the same request unkilled."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import pytest

from conftest import ROOT, running, running_by_replica, serve_run

pytestmark = pytest.mark.integration

MODEL = "tiny-chat"
TOKENS = 1800  # greedy, ignore_eos: about 4 s of generation here, still going when the replica is killed
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": TOKENS,
        "temperature": 0, "ignore_eos": True, "logprobs": True}
STREAM = {**BODY, "stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running(serve_run(ROOT / "tests" / "configs" / "migration.yaml", tmp_path_factory.mktemp("migration"))) as app:
        yield app


def replica_pids(app) -> set[int]:
    return app.descendant_pids(f"ServeReplica:llm:{MODEL}")


def replica_pid(app, replica_id: str) -> int:
    """The process of engine replica `replica_id` (the router's x-served-by-replica), from the replica's own lines in
    `serve run`'s output (Ray prefixes each with the process id; Serve's format names the replica)."""
    lines = re.findall(rf"\(ServeReplica:llm:{MODEL} pid=(\d+)\).* llm_{MODEL} {replica_id} -- ",
                       app.log_path.read_text(errors="replace"))
    assert lines, f"replica {replica_id} has no line in {app.log_path}"
    return int(lines[0])


def serving_replica(app) -> str:
    """The replica whose engine runs the one request in flight (its own running gauge, as the routers list it)."""
    deadline = time.monotonic() + 60
    while not (busy := [rid for rid, running in running_by_replica(app.url, MODEL).items() if running >= 1]):
        assert time.monotonic() < deadline, "no replica runs the request"
        time.sleep(0.1)
    assert len(busy) == 1, busy
    return busy[0]


def hand_overs(app) -> str:
    """The router's lines about failed replicas and moved requests, for a failing test's message."""
    lines = app.log_path.read_text(errors="replace").splitlines()
    return "\n".join(line[-300:] for line in lines if "moved from" in line or "failed a request" in line
                     or '"event": "request"' in line)


def two_replicas(app) -> None:
    """Waits until both replicas run and the routers know them (a killed one is replaced by Serve)."""
    deadline = time.monotonic() + 300
    while len(running_by_replica(app.url, MODEL)) < 2 or len(replica_pids(app)) != 2:
        assert time.monotonic() < deadline, "no second replica after 300 s"
        time.sleep(1)


def stream_answer(events: list[dict]) -> tuple[str, list[str], dict]:
    """(text, the tokens of its logprobs, usage) of a chat stream's events."""
    chunks = [e for e in events if e.get("choices")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    tokens = [t["token"] for c in chunks for t in (c["choices"][0].get("logprobs") or {}).get("content") or []]
    return text, tokens, next(e["usage"] for e in events if e.get("usage"))


def migrations(app) -> float:
    text = httpx.get(f"{app.url}/metrics", timeout=60).text
    return sum(float(v) for v in re.findall(r"^llm_ingress_migrations_total{[^}]*} (\S+)$", text, re.M))


async def stream(app, kill_after_s: float | None = None, victims=None) -> tuple[list[dict], list[str]]:
    """A chat stream's events and its raw `data:` lines; `victims(replica id serving it)` (pids) are SIGKILLed
    `kill_after_s` after the request was sent. By time, not by tokens read: with the engine's threads on both cores
    this client reads seconds behind the engine (even its response headers came a second or more late in one run)."""
    events, lines = [], []

    async def kill(pids: list[int]) -> None:
        await asyncio.sleep(kill_after_s)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        print(f"{time.strftime('%H:%M:%S')} killed {pids} {kill_after_s:.1f} s into the stream")

    async with httpx.AsyncClient(timeout=300) as client:
        sent = time.monotonic()
        async with client.stream("POST", f"{app.url}/v1/chat/completions", json=STREAM) as r:
            assert r.status_code == 200
            # The headers left the router within milliseconds of the request: what this client saw later, the engine
            # has been generating for already.
            kill_after_s = max(0.0, (kill_after_s or 0) - (time.monotonic() - sent))
            killing = asyncio.create_task(kill(victims(r.headers["x-served-by-replica"]))) if victims else None
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
            if killing is not None:
                await killing
    return events, lines


@pytest.fixture(scope="module")
def unkilled(app):
    """The unkilled stream's (text, tokens, usage), the unkilled JSON answer, and how long the engine took for it."""
    two_replicas(app)
    events, lines = asyncio.run(stream(app))
    started = time.monotonic()
    answer = httpx.post(f"{app.url}/v1/chat/completions", json=BODY, timeout=300).json()
    return stream_answer(events), answer, time.monotonic() - started


def test_a_greedy_stream_whose_replica_is_killed_halfway_goes_on_unchanged(app, unkilled):
    (text, tokens, usage), _, generation_s = unkilled
    assert len(tokens) == TOKENS and usage["completion_tokens"] == TOKENS
    moved = migrations(app)
    events, lines = asyncio.run(stream(app, generation_s / 2, lambda replica: [replica_pid(app, replica)]))
    assert migrations(app) == moved + 1, hand_overs(app)
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
    assert sum("role" in e["choices"][0]["delta"] for e in events if e.get("choices")) == 1
    assert not any(e.get("prompt_token_ids") or (e.get("choices") or [{}])[0].get("token_ids") for e in events)
    got_text, got_tokens, got_usage = stream_answer(events)
    assert got_tokens == tokens  # token for token
    assert got_text == text
    assert got_usage == usage


def test_a_non_streaming_request_whose_replica_is_killed_is_answered_whole(app, unkilled):
    _, expected, generation_s = unkilled
    two_replicas(app)
    moved = migrations(app)

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            started = time.monotonic()
            request = asyncio.create_task(client.post(f"{app.url}/v1/chat/completions", json=BODY))
            victim = replica_pid(app, await asyncio.to_thread(serving_replica, app))
            await asyncio.sleep(max(0.0, generation_s / 2 - (time.monotonic() - started)))  # halfway
            os.kill(victim, signal.SIGKILL)
            return await request

    r = asyncio.run(main())
    assert migrations(app) == moved + 1, hand_overs(app)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert [t["token"] for t in got["choices"][0]["logprobs"]["content"]] == \
        [t["token"] for t in expected["choices"][0]["logprobs"]["content"]]
    assert got["usage"] == expected["usage"]


def test_with_every_replica_killed_a_stream_ends_with_one_clean_error(app, unkilled):
    two_replicas(app)
    started = time.monotonic()
    events, lines = asyncio.run(stream(app, unkilled[2] / 4, lambda replica: replica_pids(app)))
    print(f"stream over after {time.monotonic() - started:.1f} s")
    assert lines[-1] == "data: [DONE]"
    errors = [e for e in events if "error" in e]
    assert len(errors) == 1 and events[-1] is errors[0]
    assert errors[0]["error"]["message"] and errors[0]["error"]["code"] >= 500
