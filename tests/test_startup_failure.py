"""An engine that cannot start ends in a clear failure after a bounded number of attempts, with vLLM's error
shown where the user looks (`serve run`'s output, `/health`), instead of replicas replaced forever."""

from __future__ import annotations

import re
import shutil
import time

import httpx
import pytest
import yaml

from conftest import ROOT, serve_run

pytestmark = pytest.mark.integration

VLLM_ERROR = "Cannot find any model weights"
GAVE_UP = "failed to start 3 times"  # Ray Serve's words once it stops retrying (3 attempts per replica)


def engine_starts(log: str) -> int:
    """vLLM engine starts that failed on the missing weights (each worker logs the error once)."""
    return len(set(re.findall(r"\(Worker pid=(\d+)\) ERROR .*Cannot find any model weights", log)))


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
                if VLLM_ERROR in health.text and GAVE_UP in health.text:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(3)
        assert health is not None and health.status_code == 503, health and health.text
        assert VLLM_ERROR in health.text and GAVE_UP in health.text, health.text
        assert VLLM_ERROR in app.log_path.read_text(errors="replace")  # `serve run` shows it too
        # Bounded: Serve keeps creating replicas now and then, but after 3 failed engine starts they refuse at once
        # with the cause ("not trying again until the next deploy") instead of starting vLLM again.
        time.sleep(30)
        assert engine_starts(app.log_path.read_text(errors="replace")) == 3
        assert httpx.get(f"{app.url}/health", timeout=10).status_code == 503
    finally:
        app.stop()
