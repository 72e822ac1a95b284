"""An engine that cannot start ends in a clear failure after a bounded number of attempts, with vLLM's error
shown where the user looks (`serve run`'s output, `/health`), instead of replicas replaced forever."""

from __future__ import annotations

import re
import shutil

import httpx
import pytest
import yaml

from conftest import ROOT, serve_run, wait_for

pytestmark = pytest.mark.integration

VLLM_ERROR = "Cannot find any model weights"
ATTEMPTS = 2  # the deployment's max_constructor_retry_count (default 3, checked in test_config): one start fewer
GAVE_UP = f"failed to start {ATTEMPTS} times"  # Ray Serve's words once it stops retrying


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
    model["deployment"]["max_constructor_retry_count"] = ATTEMPTS
    path = tmp_path / "weightless.yaml"
    path.write_text(yaml.safe_dump(config))
    app = serve_run(path, tmp_path, env={"LLM_TEST_API_KEYS": "k"})
    log = lambda: app.log_path.read_text(errors="replace")  # noqa: E731

    def gave_up() -> httpx.Response | None:
        assert app.alive(), app.log_tail()
        try:
            health = httpx.get(f"{app.url}/health", timeout=10)
        except httpx.HTTPError:
            return None
        return health if VLLM_ERROR in health.text and GAVE_UP in health.text else None

    try:
        health = wait_for(gave_up, 420, "/health names vLLM's error and that Serve gave up")
        assert health.status_code == 503, health.text
        # Bounded: once Serve gave up it starts no replica (Ray Serve: no upscale once terminally failed). Wait for
        # the last failed replica's process to be gone and its engine's error to reach the log; then exactly
        # ATTEMPTS engines were started, and none is starting now.
        wait_for(lambda: not app.descendant_pids("ServeReplica:llm:weightless"), 120, "the failed replicas exit")
        wait_for(lambda: engine_starts(log()) >= ATTEMPTS, 60, f"{ATTEMPTS} failed engine starts in the log")
        assert engine_starts(log()) == ATTEMPTS
        assert not app.descendant_pids("ServeReplica:llm:weightless")
        assert httpx.get(f"{app.url}/health", timeout=10).status_code == 503
    finally:
        app.stop()
