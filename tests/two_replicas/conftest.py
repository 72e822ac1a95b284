"""The package's app: two tiny-chat replicas with a LoRA adapter and prefix-aware routing, started once for the
LoRA, routing and migration tests and stopped after the last of them (an app of two engines costs about a minute
to start on 2 cores)."""

from __future__ import annotations

import pytest

from conftest import ROOT, running, serve_run


@pytest.fixture(scope="package")
def app(tmp_path_factory):
    with running(serve_run(ROOT / "tests" / "configs" / "lora.yaml", tmp_path_factory.mktemp("two-replicas"))) as app:
        yield app
