"""An engine that cannot start ends in a clear failure after a bounded number of attempts, with vLLM's error
shown where the user looks (`serve run`'s output, `/health`), instead of replicas replaced forever."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
import yaml

from conftest import ROOT, serve_run

pytestmark = pytest.mark.integration

VLLM_ERROR = "Cannot find any model weights"


@pytest.mark.timeout(600)
def test_an_engine_that_cannot_start_fails_clearly_and_stops_retrying(tmp_path):
    weightless = tmp_path / "weightless"  # the tiny chat model without its weights: vLLM refuses it
    shutil.copytree(ROOT / "models" / "tiny-chat", weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    config = yaml.safe_load((ROOT / "tests" / "configs" / "guarded.yaml").read_text())
    model = config["applications"][0]["args"]["models"][0]
    model |= {"name": "weightless", "source": str(weightless)}
    path = tmp_path / "weightless.yaml"
    path.write_text(yaml.safe_dump(config))
    app = serve_run(path, tmp_path, env={"LLM_TEST_API_KEYS": "k"})
    try:
        deadline = time.monotonic() + 420
        health = None
        while time.monotonic() < deadline and app.process.poll() is None:
            try:
                health = httpx.get(f"{app.url}/health", timeout=10)
                if VLLM_ERROR in health.text:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(3)
        assert health is not None and health.status_code == 503 and VLLM_ERROR in health.text, health and health.text
        assert VLLM_ERROR in app.log_path.read_text(errors="replace")  # `serve run` shows it too
        # Bounded: once Serve gave up, no replica of the model is started again.
        time.sleep(20)
        assert not app.descendant_pids("ServeReplica:llm:weightless")
        assert httpx.get(f"{app.url}/health", timeout=10).status_code == 503
    finally:
        app.stop()
