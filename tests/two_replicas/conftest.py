"""The package's app: two tiny-chat replicas with a LoRA adapter and prefix-aware routing, started once for the
LoRA, routing and migration tests and stopped after the last of them (an app of two engines costs about a minute
to start on 2 cores). test_lora's reference, `vllm serve` with the same adapter, starts beside it: one wait for
both."""

from __future__ import annotations

import pytest

from conftest import ROOT, import_script, running, serve_run

BASE, ADAPTER = "tiny-chat", "tiny-lora"  # as in tests/configs/lora.yaml
BASE_PATH, ADAPTER_PATH = ROOT / "models" / "tiny-chat", ROOT / "models" / "tiny-chat-lora"


@pytest.fixture(scope="package")
def vllm_serve_with_adapter(tmp_path_factory):
    """Started, not yet ready: test_lora waits for it, takes its answers and stops it."""
    server = import_script("bench").vllm_serve(
        str(BASE_PATH), BASE, tmp_path_factory.mktemp("vllm-lora"), "--max-model-len", "2048", "--enable-lora",
        "--max-loras", "2", "--lora-modules", f"{ADAPTER}={ADAPTER_PATH}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def app(tmp_path_factory, vllm_serve_with_adapter):
    with running(serve_run(ROOT / "tests" / "configs" / "lora.yaml", tmp_path_factory.mktemp("two-replicas"))) as app:
        yield app
