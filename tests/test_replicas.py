"""Unit tests for the router's view of engine replicas (`app.replicas.ReplicaPool`): least loaded pick, slots,
bounded waiting, replicas that leave or refuse connections."""

from __future__ import annotations

import asyncio

import pytest

from app import replicas
from app.replicas import NoCapacity, ReplicaPool

ROUTES = ["/v1/chat/completions"]


def running(*ids: str) -> dict[str, dict]:
    return {rid: {"url": f"http://10.0.0.1:{9000 + i}", "routes": ROUTES} for i, rid in enumerate(ids)}


def pool(max_ongoing=2, max_queued=1, ids=("a", "b")) -> ReplicaPool:
    p = ReplicaPool("m", max_ongoing, max_queued)
    p.update(running(*ids))
    return p


def test_picks_the_least_loaded_replica():
    async def main():
        p = pool()
        async with p.slot(1) as first, p.slot(1) as second:
            assert {first.replica_id, second.replica_id} == {"a", "b"}  # spread, not stacked
            async with p.slot(1) as third:
                assert third.ongoing == 2
        assert all(r.ongoing == 0 for r in p.replicas.values())

    asyncio.run(main())


def test_full_replicas_queue_then_refuse_at_once():
    async def main():
        p = pool(max_ongoing=1, max_queued=1, ids=("a",))
        queued = p.slot(5)
        async with p.slot(1):
            waiter = asyncio.create_task(queued.__aenter__())
            await asyncio.sleep(0.01)
            assert p.waiting == 1
            with pytest.raises(NoCapacity, match="overloaded"):
                await p.slot(5).__aenter__()  # the queue is full: refused without waiting
        replica = await asyncio.wait_for(waiter, 1)  # the slot freed: the waiter got it
        assert replica.replica_id == "a" and replica.ongoing == 1

    asyncio.run(main())


def test_waiting_times_out():
    async def main():
        p = pool(max_ongoing=1, max_queued=5, ids=("a",))
        async with p.slot(1):
            with pytest.raises(NoCapacity, match="No slot came free within 0.05 s"):
                async with p.slot(0.05):
                    pass

    asyncio.run(main())


def test_no_replica_is_refused_with_a_reason_after_a_short_wait():
    async def main():
        with pytest.raises(NoCapacity, match="no running replica"):
            async with ReplicaPool("m", 1, 1).slot(0.05):
                pass

    asyncio.run(main())


def test_a_request_waits_for_a_replica_that_is_starting():
    async def main():
        p = ReplicaPool("m", 1, 1)
        waiter = asyncio.create_task(p.slot(5).__aenter__())
        await asyncio.sleep(0.05)
        p.update(running("a"))  # e.g. the replica that replaces a killed one
        assert (await asyncio.wait_for(waiter, 1)).replica_id == "a"

    asyncio.run(main())


def test_a_replica_that_refused_a_connection_is_skipped_for_a_while(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(replicas.time, "monotonic", lambda: now[0])
    p = pool(ids=("a", "b"))
    p.mark_down(p.replicas["a"])
    assert {p.pick().replica_id for _ in range(3)} == {"b"}
    now[0] += replicas.RETRY_DOWN_AFTER_S + 1
    p.replicas["b"].ongoing = 1
    assert p.pick().replica_id == "a"  # tried again later


def test_a_waiting_request_gets_a_replica_when_its_down_period_ends(monkeypatch):
    monkeypatch.setattr(replicas, "RETRY_DOWN_AFTER_S", 0.2)
    p = pool(ids=("a",))

    async def main():
        p.mark_down(p.replicas["a"])
        started = asyncio.get_running_loop().time()
        async with p.slot(5) as replica:  # nothing else happens: only the end of the down period can wake it
            return replica.replica_id, asyncio.get_running_loop().time() - started

    replica_id, waited = asyncio.run(main())
    assert replica_id == "a" and 0.2 <= waited < 2


def test_update_follows_the_running_set_and_keeps_counts():
    p = pool(ids=("a", "b"))
    p.replicas["a"].ongoing = 1
    p.update(running("a", "c"))
    assert set(p.replicas) == {"a", "c"} and p.replicas["a"].ongoing == 1
    assert "/v1/chat/completions" in p.routes



def test_a_replica_refusing_as_full_gets_one_probe_per_pause_and_returns_when_it_accepts(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(replicas.time, "monotonic", lambda: now[0])
    p = pool(max_ongoing=8, ids=("a",))
    a = p.replicas["a"]
    p.mark_refused(a)  # other routers filled it
    assert p.pick() is None
    now[0] += replicas.REFUSED_PAUSE_S
    assert p.pick() is a  # the probe
    assert p.pick() is None  # only one per pause, not every waiting request at once
    p.mark_accepted(a)
    assert p.pick() is a and p.pick() is a


def test_a_waiting_request_gets_a_replica_once_it_stops_refusing():
    async def main():
        p = pool(max_ongoing=8, max_queued=4, ids=("a",))
        p.mark_refused(p.replicas["a"])
        started = asyncio.get_running_loop().time()
        async with p.slot(5) as replica:  # woken when the pause ends, with no slot of this router freed
            assert replica.replica_id == "a"
        assert asyncio.get_running_loop().time() - started < 1

    asyncio.run(main())


def test_updates_from_the_directory_reach_a_subscriber_on_its_loop():
    from app import replica_directory

    async def main():
        p = ReplicaPool("m", 1, 1)
        replica_directory.subscribe("app-t", "dep-t", p.update)
        # Serve's handle routers run on another thread.
        await asyncio.to_thread(replica_directory.announce, "app-t", "dep-t", running("a", "b"))
        while len(p.replicas) < 2:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(replica_directory.announce, "app-t", "dep-t", running("b"))
        while "a" in p.replicas:
            await asyncio.sleep(0.01)
        late = ReplicaPool("m", 1, 1)
        replica_directory.subscribe("app-t", "dep-t", late.update)  # a late subscriber gets the latest at once
        assert set(late.replicas) == {"b"}

    asyncio.run(asyncio.wait_for(main(), 5))
