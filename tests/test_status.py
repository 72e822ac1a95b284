"""Unit tests for the routes the router answers itself (`app.status`): honest readiness in `/v1/models`, and the
bounded wait of a request for a model that is still starting (`app.replicas`, `limits.starting_model_wait_s`)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from app.config import AppConfig
from app.model_table import ModelTable
from app.replicas import NoCapacity, ReplicaPool
from app.status import Status


class NoAdapters:
    async def refresh(self):
        pass

    def all(self):
        return []


def table(limits=None) -> ModelTable:
    config = AppConfig.model_validate({"models": [{"name": "late", "source": "x"}, {"name": "up", "source": "y"}],
                                       "limits": limits or {}})
    t = ModelTable.__new__(ModelTable)  # no Ray: the pools alone, as ModelTable builds them
    t.config, t.app_name, t.deployments, t.backends = config, "app", {"late": "late", "up": "up"}, dict.fromkeys(
        ("late", "up"), "cpu")
    t.pools = {m.name: ReplicaPool(m.name, 4, 4, no_replica_wait_s=config.limits.starting_model_wait_s)
               for m in config.models}
    t.adapters = NoAdapters()
    return t


def test_models_list_says_which_models_serve_now_ready_ones_first():
    async def main():
        t = table()
        t.pools["up"].update({"r1": {"url": "http://127.0.0.1:1", "routes": ["/v1/chat/completions"]}})
        async with aiohttp.ClientSession() as session:
            response = await Status(t, None, session, []).list_models({"headers": []})
        cards = json.loads(response.body)["data"]
        assert [(c["id"], c["ready"]) for c in cards] == [("up", True), ("late", False)]

    asyncio.run(main())


def test_model_table_gives_pools_the_configured_starting_wait():
    config = AppConfig.model_validate({"models": [{"name": "m", "source": "x"}],
                                       "limits": {"starting_model_wait_s": 7.5}})
    t = ModelTable(config, "app", {"m": "m"}, {"m": "cpu"})
    assert t.pools["m"].no_replica_wait_s == 7.5
    assert AppConfig.model_validate({"models": [{"name": "m", "source": "x"}]}).limits.starting_model_wait_s == 60


def test_a_request_for_a_starting_model_waits_for_its_first_replica_then_is_served():
    async def main():
        pool = table().pools["late"]
        waiter = asyncio.create_task(pool.slot(600).__aenter__())
        await asyncio.sleep(0.2)
        assert not waiter.done()  # no instant 503 while the engine starts
        pool.update({"r1": {"url": "http://10.0.0.1:9000", "routes": ["/v1/chat/completions"]}})
        assert (await asyncio.wait_for(waiter, 1)).replica_id == "r1"

    asyncio.run(main())


def test_the_wait_for_a_starting_model_is_bounded_by_the_limit():
    async def main():
        pool = table({"starting_model_wait_s": 0.2}).pools["late"]
        started = time.monotonic()
        with pytest.raises(NoCapacity, match="no running replica.*within 0.2 s"):
            async with pool.slot(600):
                pass
        assert 0.15 < time.monotonic() - started < 2

    asyncio.run(main())
