"""The engine replica's health check when a node with vLLM's Ray workers is lost (the GPU hang of issue 15: vLLM 0.26
stops its executor but neither fails its engine nor its requests). The CPU two-node test covers the whole app; this
covers what the check does, which vLLM 0.32's CPU build (it fails its engine itself) never reaches there."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from app import engine as engine_module
from app.admission import Admission
from app.engine import EngineServer


class Engine:
    """Records what the check does to vLLM's AsyncLLM."""

    def __init__(self):
        self.errors, self.stopped, self.checked = [], False, 0
        self.output_processor = SimpleNamespace(propagate_error=self.errors.append)

    def shutdown(self):
        self.stopped = True

    async def check_health(self):
        self.checked += 1


class Replica(EngineServer):
    def __del__(self):  # Serve awaits the real (async) one at shutdown; nothing to stop here
        pass


def replica(placement_now, monkeypatch) -> tuple[EngineServer, Engine, Admission]:
    server = Replica.__new__(Replica)

    async def serving():
        await asyncio.sleep(3600)

    server.spec = SimpleNamespace(name="big")
    server.engine = Engine()
    server.http = Admission(None, lambda: 8)
    server._broken = None
    server._placement = ("CREATED", {0: "node-a", 1: "node-b"})
    server._server_task = asyncio.get_running_loop().create_task(serving())
    monkeypatch.setattr(engine_module, "_placement", lambda: placement_now)
    return server, server.engine, server.http


def test_a_lost_node_fails_the_check_ends_open_requests_and_stops_the_engine(monkeypatch):
    async def run():
        server, engine, admission = replica(("RESCHEDULING", {0: "node-a", 1: None}), monkeypatch)
        with pytest.raises(RuntimeError, match="placement group changed"):
            await server.check_health()
        assert admission.closed == "broken"  # new requests are refused: routers send them elsewhere
        assert len(engine.errors) == 1 and "placement group changed" in str(engine.errors[0])
        assert type(engine.errors[0]).__name__ == "EngineDeadError"  # what vLLM's handlers turn into an error reply
        assert engine.stopped and engine.checked == 0
        with pytest.raises(RuntimeError, match="placement group changed"):  # and stays failed, done once
            await server.check_health()
        assert len(engine.errors) == 1
        server._server_task.cancel()

    asyncio.run(run())


def test_an_unchanged_placement_asks_the_engine(monkeypatch):
    async def run():
        server, engine, admission = replica(("CREATED", {0: "node-a", 1: "node-b"}), monkeypatch)
        await server.check_health()
        assert engine.checked == 1 and not engine.errors and not engine.stopped and admission.closed is None
        server._server_task.cancel()

    asyncio.run(run())
