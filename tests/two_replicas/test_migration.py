"""Requests outlive their engine replica (`app.migration`), on the real app: two replicas of the tiny chat model (the
package's app), the one serving a greedy request SIGKILLed halfway; the client's answer is that of the same request
unkilled. Last in the package: the kills leave replicas starting."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import psutil
import pytest

from conftest import running_by_replica, wait_for

pytestmark = pytest.mark.integration

MODEL = "tiny-chat"
TOKENS = 2000  # greedy, ignore_eos: seconds of generation here (the model's context is 2,048)
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": TOKENS,
        "temperature": 0, "ignore_eos": True, "logprobs": True}
KILL_AFTER_EVENTS = 10  # the role chunk and 9 tokens: early, since the client reads behind the engine on 2 cores
STREAM = {**BODY, "stream": True, "stream_options": {"include_usage": True}}


def replica_pids(app) -> set[int]:
    return app.descendant_pids(f"ServeReplica:llm:{MODEL}")


def replica_pid(app, replica_id: str) -> int:
    """The process of engine replica `replica_id` (the router's x-served-by-replica), from the replica's start-up line
    in `serve run`'s output (Ray prefixes it with the process id; Serve's format names the replica)."""
    found = re.findall(rf"\(ServeReplica:llm:{MODEL} pid=(\d+)\).* {replica_id} -- model {MODEL}: ready at",
                       app.log_path.read_text(errors="replace"))
    assert found, f"replica {replica_id} has no start-up line in {app.log_path}"
    return int(found[-1])


def hand_overs(app) -> str:
    """The router's lines about failed replicas and moved requests, for a failing test's message."""
    lines = app.log_path.read_text(errors="replace").splitlines()
    return "\n".join(line[-300:] for line in lines if "moved from" in line or "failed a request" in line
                     or '"event": "request"' in line)


def two_replicas(app) -> None:
    """Waits until both replicas run and the routers know them (a killed one is replaced by Serve)."""
    wait_for(lambda: len(running_by_replica(app.url, MODEL)) >= 2 and len(replica_pids(app)) == 2, 300,
             "a second replica")


def stream_answer(events: list[dict]) -> tuple[str, list[str], dict]:
    """(text, the tokens of its logprobs, usage) of a chat stream's events."""
    chunks = [e for e in events if e.get("choices")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    tokens = [t["token"] for c in chunks for t in (c["choices"][0].get("logprobs") or {}).get("content") or []]
    return text, tokens, next(e["usage"] for e in events if e.get("usage"))


def migrations(app) -> float:
    text = httpx.get(f"{app.url}/metrics", timeout=60).text
    return sum(float(v) for v in re.findall(r"^llm_ingress_migrations_total{[^}]*} (\S+)$", text, re.M))


def busiest(pids: set[int], seconds: float = 0.5) -> int:
    """Of replica processes `pids`, the one whose process tree (the replica, vLLM's engine core and worker) used the
    most CPU over `seconds`: the one running the request in flight (an idle engine waits without computing)."""
    def cpu(pid: int) -> float:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    before = {pid: cpu(pid) for pid in pids}
    time.sleep(seconds)
    return max(pids, key=lambda pid: cpu(pid) - before[pid])


def moved_once(app, attempt) -> None:
    """Runs `attempt()` (a request whose replica it kills) until the routers moved a request (the kill came while the
    engine generated), at most 3 times: on 2 busy cores an engine can now and then finish before the kill lands."""
    for _ in range(3):
        two_replicas(app)
        moved = migrations(app)
        attempt()
        if migrations(app) > moved:
            return
    pytest.fail(f"no request moved in 3 attempts:\n{hand_overs(app)}")


async def stream(app, kill: str | None = None) -> tuple[list[dict], list[str]]:
    """A chat stream's events and its raw `data:` lines; kill "serving": its replica (x-served-by-replica) is SIGKILLed
    once the client has read KILL_AFTER_EVENTS events, "all": every replica then."""
    events, lines = [], []
    async with httpx.AsyncClient(timeout=300) as client:
        async with client.stream("POST", f"{app.url}/v1/chat/completions", json=STREAM) as r:
            assert r.status_code == 200
            victims = set() if kill is None else replica_pids(app) if kill == "all" else \
                {replica_pid(app, r.headers["x-served-by-replica"])}
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
                    if len(events) == KILL_AFTER_EVENTS:  # tokens the continuation must carry
                        for pid in victims:
                            os.kill(pid, signal.SIGKILL)
    return events, lines


@pytest.fixture(scope="module")
def unkilled(app):
    """The unkilled stream's (text, tokens, usage) and the unkilled JSON answer."""
    two_replicas(app)
    events, _ = asyncio.run(stream(app))
    answer = httpx.post(f"{app.url}/v1/chat/completions", json=BODY, timeout=300).json()
    return stream_answer(events), answer


def test_a_greedy_stream_whose_replica_is_killed_halfway_goes_on_unchanged(app, unkilled):
    (text, tokens, usage), _ = unkilled
    assert len(tokens) == TOKENS and usage["completion_tokens"] == TOKENS

    def attempt():
        events, lines = asyncio.run(stream(app, kill="serving"))
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
        assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
        assert sum("role" in e["choices"][0]["delta"] for e in events if e.get("choices")) == 1
        assert not any(e.get("prompt_token_ids") or (e.get("choices") or [{}])[0].get("token_ids") for e in events)
        got_text, got_tokens, got_usage = stream_answer(events)
        assert got_tokens == tokens  # token for token
        assert got_text == text
        assert got_usage == usage

    moved_once(app, attempt)


def test_a_non_streaming_request_whose_replica_is_killed_is_answered_whole(app, unkilled):
    _, expected = unkilled

    def attempt():
        async def main():
            async with httpx.AsyncClient(timeout=300) as client:
                request = asyncio.create_task(client.post(f"{app.url}/v1/chat/completions", json=BODY))
                os.kill(await asyncio.to_thread(busiest, replica_pids(app)), signal.SIGKILL)
                return await request

        r = asyncio.run(main())
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
        assert [t["token"] for t in got["choices"][0]["logprobs"]["content"]] == \
            [t["token"] for t in expected["choices"][0]["logprobs"]["content"]]
        assert got["usage"] == expected["usage"]

    moved_once(app, attempt)


def test_with_every_replica_killed_requests_end_with_one_clean_error_and_no_engine_process_lives(app, unkilled):
    """No replica left to move to: a stream ends with one in-band error, a JSON request gets a 5xx JSON error, and the
    engine processes (vLLM's engine core and worker) die with their killed replicas."""
    async def kill_all():
        async with httpx.AsyncClient(timeout=300) as client:
            plain = asyncio.create_task(client.post(f"{app.url}/v1/chat/completions", json=BODY))
            events, lines = await stream(app, kill="all")  # the plain request started first: in flight at the kill
            return await plain, events, lines

    for _ in range(3):  # an engine that finished before the kills landed gave a whole answer: again
        # Not waiting for the replacement of the replica the test before killed (a minute of both cores): every
        # replica there is dies, the one serving and any still starting.
        wait_for(lambda: running_by_replica(app.url, MODEL), 300, "a running replica")
        engines = [c for pid in replica_pids(app) for c in psutil.Process(pid).children(recursive=True)
                   if c.name().startswith("VLLM::")]
        assert len(engines) >= 2, engines  # the running replica's engine core and worker
        started = time.monotonic()
        plain, events, lines = asyncio.run(kill_all())
        print(f"stream over after {time.monotonic() - started:.1f} s")
        assert lines[-1] == "data: [DONE]"
        errors = [e for e in events if "error" in e]
        if errors:
            assert len(errors) == 1 and events[-1] is errors[0]
            assert errors[0]["error"]["message"] and errors[0]["error"]["code"] >= 500
            assert plain.status_code >= 500 and plain.json()["error"]["message"], plain.text
            _, alive = psutil.wait_procs(engines, timeout=30)
            assert not alive, alive
            return
        assert stream_answer(events)[2]["completion_tokens"] == TOKENS
    pytest.fail("the engine finished before the kills in 3 attempts")
