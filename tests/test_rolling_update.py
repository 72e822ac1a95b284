"""Graceful rolling update and scale-down: `serve deploy` of a changed config while clients stream back to back.
Every stream ends with [DONE], no client sees an error, and the new config serves afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import httpx
import pytest
import yaml
from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

from conftest import ROOT, running, running_by_replica, serve_run, wait_for

pytestmark = pytest.mark.integration

CONFIG = ROOT / "tests" / "configs" / "rolling.yaml"
CLIENTS = 6  # streams always in flight on every replica; more only starve the new engine's start of CPU (2 cores)
STREAM = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 48,
          "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def rolling(tmp_path_factory):
    with running(serve_run(CONFIG, tmp_path_factory.mktemp("rolling"))) as app:
        yield app


def dashboard(app) -> str:
    """The Ray dashboard of the cluster `serve run` started (where `serve deploy` sends configs)."""
    match = re.search(r"dashboard at \S*(http://[\d.]+:\d+)", app.log_path.read_text(errors="replace"))
    return match.group(1)


def deploy(app, change=None, num_replicas: int | None = None) -> None:
    """`serve deploy`'s request for the running config (its port included), with `change` applied to the model's entry
    and/or the model's replica count set through Serve's own `deployments:` override (which restarts no replica)."""
    config = yaml.safe_load(Path(app.process.args[-1]).read_text())  # the config `serve run` got
    model = config["applications"][0]["args"]["models"][0]
    if change:
        change(model)
    if num_replicas is not None:
        config["applications"][0]["deployments"] = [{"name": "tiny-chat", "num_replicas": num_replicas}]
    # What `serve deploy` sends, sent from here: under the tests' load a CLI process needs about a minute to start.
    # Ray 2.60 starts local clusters with token auth (the token in ~/.ray/auth_token unless RAY_AUTH_TOKEN is set).
    token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
    ServeSubmissionClient(dashboard(app), headers={"Authorization": f"Bearer {token}"}).deploy_applications(config)


async def stream_until(url: str, done: asyncio.Event, results: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=180) as client:
        while not done.is_set():
            try:
                async with client.stream("POST", "/v1/chat/completions", json=STREAM) as r:
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                errors = [line for line in lines[:-1] if "error" in json.loads(line[len("data: "):])]
                results.append((r.status_code, lines[-1] if lines else "", bool(errors)))
            except httpx.HTTPError as e:
                results.append((599, repr(e), True))


def under_load(app, action) -> list:
    """Runs `action` (blocking) while CLIENTS clients stream back to back; returns every stream's outcome."""
    async def main():
        done, results = asyncio.Event(), []
        clients = [asyncio.create_task(stream_until(app.url, done, results)) for _ in range(CLIENTS)]
        await asyncio.sleep(3)
        await asyncio.to_thread(action)
        await asyncio.sleep(3)
        done.set()
        await asyncio.gather(*clients)
        return results

    return asyncio.run(main())


def replicas(app) -> set[int]:
    return app.descendant_pids("ServeReplica:llm:tiny-chat")


def assert_all_clean(results: list) -> None:
    bad = [r for r in results if r[0] != 200 or r[1] != "data: [DONE]" or r[2]]
    # Each client streams back to back from before the change until after it: at least one stream each, none bad.
    # (A count of streams would measure how long the change took: 19 streams once replicas forked their workers.)
    assert len(results) >= CLIENTS and not bad, (len(results), bad[:5])


def max_model_len(app) -> int | None:
    cards = httpx.get(f"{app.url}/v1/models", timeout=30).json()["data"]
    return cards[0].get("max_model_len")


@pytest.mark.timeout(900)
def test_scale_down_drains_under_streams(rolling):
    # Scaling through Serve's `deployments:` override is a light update: a running replica stays.
    before = replicas(rolling)
    assert len(before) == 2, before
    wait_for(lambda: len(running_by_replica(rolling.url)) == 2, 420, "both replicas in the router's table", 2)

    def scale_down():
        deploy(rolling, num_replicas=1)
        wait_for(lambda: len(replicas(rolling)) == 1, 420, "one replica left", 2)

    assert_all_clean(under_load(rolling, scale_down))
    assert replicas(rolling) < before


@pytest.mark.timeout(900)
def test_rolling_update_under_streams(rolling):
    old = replicas(rolling)

    def update():
        deploy(rolling, change, num_replicas=1)  # a new engine for the replica
        wait_for(lambda: max_model_len(rolling) == 1024 and not (replicas(rolling) & old), 420,
                 "only replicas of the new config", 2)

    assert_all_clean(under_load(rolling, update))
    assert httpx.post(f"{rolling.url}/v1/completions", timeout=60,
                      json={"model": "tiny-chat", "prompt": "x " * 1100, "max_tokens": 2}).status_code == 400


def change(model: dict) -> None:
    model["engine_args"].update(max_model_len=1024)  # from 2048
