"""The CPU-under-Ray vLLM platform plugin: activation logic (fast), and the app serving through one engine
whose workers are spread over two Ray nodes."""

from __future__ import annotations

import pathlib
import pickle
import shutil
import tempfile
import time
from importlib.metadata import entry_points

import pytest

from llm_test_support import cpu_ray_platform

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_CHAT = ROOT / "models" / "tiny-chat"
ENTRY_POINT = "llm_test_support.cpu_ray_platform:register"


def plugin_installed() -> bool:
    return any(ep.value == ENTRY_POINT for ep in entry_points(group="vllm.platform_plugins"))


@pytest.mark.parametrize("value", [None, "", "0", "false", "no"])
def test_register_stays_off_unless_enabled(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(cpu_ray_platform.ACTIVATE_ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_ray_platform.ACTIVATE_ENV, value)
    assert cpu_ray_platform.register() is None


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_register_names_the_platform_when_enabled(monkeypatch, value):
    monkeypatch.setenv(cpu_ray_platform.ACTIVATE_ENV, value)
    assert cpu_ray_platform.register() == "llm_test_support.cpu_ray_platform.CpuRayPlatform"


def test_platform_is_cpu_with_a_ray_device_key():
    from vllm.platforms.cpu import CpuPlatform

    platform = cpu_ray_platform.CpuRayPlatform
    assert issubclass(platform, CpuPlatform)
    assert platform.ray_device_key == "cpu_device"
    # vLLM's Ray executor sets these to "1" in each worker's runtime_env: workers activate the plugin too.
    assert cpu_ray_platform.ACTIVATE_ENV in platform.ray_noset_device_env_vars


def test_lazy_classes_pickle_by_reference():
    for name in ("CpuRayPlatform", "CpuRayExecutor", "CpuRayWorkerWrapper"):
        cls = getattr(cpu_ray_platform, name)
        assert pickle.loads(pickle.dumps(cls)) is cls
    assert cpu_ray_platform.CpuRayExecutor.uses_ray
    with pytest.raises(AttributeError):
        cpu_ray_platform.NoSuchThing  # noqa: B018


def test_entry_point_is_declared():
    if not plugin_installed():
        pytest.skip(f"entry point {ENTRY_POINT} not installed (pip install -e .)")
    assert plugin_installed()


# fp32: exact comparison. Not enforce_eager (nor VLLM_CPU_CI_ENV's eager backend): pipeline stages need the compile
# warm-up (see the plugin).
ENGINE = {"max_model_len": 256, "max_num_seqs": 4, "dtype": "float32"}
# Measured 40-98 s (alone, and beside the two-replica package under `make test`); the rest is headroom for a loaded
# CI machine, where the app's own start once took 265 s.
REPLACEMENT_WAIT_S = 600


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A Ray cluster of two virtual nodes with one `cpu_device` each, connected as this test's driver."""
    import ray

    from conftest import local_ray_cluster

    # Raylets (started below) pass these to every worker and to vLLM's engine-core processes.
    monkeypatch.setenv(cpu_ray_platform.ACTIVATE_ENV, "1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM's engine core is a Ray driver started inside a Ray worker; on Ray 2.60 it turns token auth on by
    # itself when ~/.ray/auth_token exists, and the GCS of this auth-less test cluster then cannot reach it.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # vLLM's Ray executor requires one IP per node; virtual nodes share the host, so give each its own.
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    # The test loses a node on purpose: Ray's GCS declares it dead after 3 failed health checks 1 s apart, not
    # Ray's 5 checks 3 s apart (a check fails at once on a killed raylet, or after health_check_timeout_ms).
    monkeypatch.setenv("RAY_health_check_period_ms", "1000")
    monkeypatch.setenv("RAY_health_check_failure_threshold", "3")
    # Pipeline stages need the inductor compile warm-up (see ENGINE): not the eager CI mode conftest sets.
    monkeypatch.delenv("VLLM_CPU_CI_ENV", raising=False)
    node_args = {"num_cpus": 2, "resources": {"cpu_device": 1}, "include_dashboard": False}
    # A private temp dir: other Ray users on this machine (address="auto") must not find this cluster.
    temp_dir = tempfile.mkdtemp(prefix="rtcpu-")
    # The head alone has `head_node`: the test pins the router there, so that losing the other node is an engine's loss.
    cluster = local_ray_cluster(**{**node_args, "resources": {"cpu_device": 1, "head_node": 1}}, temp_dir=temp_dir)
    try:
        cluster.add_device_node = lambda: cluster.add_node(**node_args, temp_dir=temp_dir,
                                                           env_vars={"VLLM_HOST_IP": "127.0.0.2"})
        cluster.add_device_node()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def greedy(client, model: str, prompt: str) -> tuple[list[int], list[float]]:
    """Greedy token ids and each one's logprob (a random tiny model repeats tokens: the logprobs show that two
    layouts compute the same function, not only the same argmax)."""
    choice = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, logprobs=1,
                                       extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]
    return choice.token_ids, choice.logprobs.token_logprobs


def get_through_reloads(url: str):
    """GET, tried again when the connection is reset: Serve's proxies reconfigure when a node is lost."""
    import httpx

    for attempt in range(5):
        try:
            return httpx.get(url, timeout=30)
        except httpx.TransportError:
            if attempt == 4:
                raise
            time.sleep(1)


def named_unhealthy(health, model: str) -> bool:
    return health.status_code == 503 and model in health.json().get("models", {})


def serve_state(cluster, deployment: str) -> str:
    """What a failed wait needs to say why: the cluster's nodes and placement groups, Serve's view of the app's
    deployments, and the tail of the deployment's newest replica log."""
    import ray
    from ray import serve

    nodes = [(n["NodeManagerAddress"], n["Alive"]) for n in ray.nodes()]
    groups = [(g["state"], sorted(set(g["bundles_to_node_id"].values()))) for g in
              ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    deployments = {name: (d.status, d.message, d.replica_states)
                   for name, d in serve.status().applications["llm"].deployments.items()}
    serve_logs = pathlib.Path(cluster.head_node.get_session_dir_path()) / "logs" / "serve"
    logs = sorted(serve_logs.glob(f"replica_llm_*{deployment}*.log"), key=lambda f: f.stat().st_mtime)
    tail = "\n".join(logs[-1].read_text(errors="replace").splitlines()[-25:]) if logs else "(no replica log)"
    return f"nodes {nodes}\nplacement groups {groups}\ndeployments {deployments}\n{logs[-1] if logs else ''}:\n{tail}"


@pytest.mark.integration
@pytest.mark.timeout(1500)  # above the sum of its waits' own bounds, which fail first and say why
def test_app_serves_through_an_engine_whose_workers_span_two_ray_nodes(two_node_cluster, record_property):
    """The real app (ingress + engine deployments, built from a config) on two Ray nodes of one device each:
    a model asking for TP=2 is laid out as TP=1 x PP=2 (tensor parallel stays inside a node), its vLLM
    workers sit on both nodes, and it answers through the ingress exactly like a copy on one device."""
    if not plugin_installed():
        pytest.skip(f"entry point {ENTRY_POINT} not installed (pip install -e .)")
    import httpx
    import openai
    import ray
    from openai import OpenAI
    from ray import serve

    from app.builder import build_app, gpu_engine
    from app.config import ModelSpec
    from launch import free_port

    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Nested drivers (vLLM's engine core) find the cluster by RAY_ADDRESS, not by /tmp/ray's latest cluster.
    on_cluster = {"RAY_ADDRESS": two_node_cluster.address}
    split = {"name": "tiny-split", "source": str(TINY_CHAT), "backend": "gpu", "accelerator": "cpu_device",
             "tensor_parallel_size": 2, "engine_args": ENGINE, "env": on_cluster,
             "deployment": {"num_cpus": 0.5, "health_check_period_s": 2}}  # finds the lost node sooner
    overrides, _ = gpu_engine(ModelSpec.model_validate(split))
    assert (overrides["tensor_parallel_size"], overrides["pipeline_parallel_size"]) == (1, 2)
    args = {"models": [
        split,
        # The one-device copy runs eagerly (vLLM's CPU-CI mode: one inductor compile fewer, tens of seconds here);
        # fp32 keeps its logprobs within 1e-3 of the compiled split model's.
        {"name": "tiny-one", "source": str(TINY_CHAT), "backend": "cpu", "engine_args": ENGINE,
         "env": {**on_cluster, "VLLM_CPU_CI_ENV": "1"},
         "deployment": {"num_cpus": 0.5, "resources": {"head_node": 0.01}}},  # stays up
    ], "ingress": {"resources": {"head_node": 0.01}}}
    started = time.monotonic()
    serve.run(build_app(args), name="llm", route_prefix="/")
    record_property("app_running_s", round(time.monotonic() - started))  # phase times: in the JUnit XML
    base_url = f"http://127.0.0.1:{port}"

    listed = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]
    assert {m["id"]: m["backend"] for m in listed} == {"tiny-split": "gpu", "tiny-one": "cpu"}
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = "The capital of France is"
    split_tokens, split_logprobs = greedy(client, "tiny-split", prompt)
    one_tokens, one_logprobs = greedy(client, "tiny-one", prompt)
    print("split", split_tokens, [round(x, 4) for x in split_logprobs])
    print("one  ", one_tokens, [round(x, 4) for x in one_logprobs])
    assert len(split_tokens) == 16
    assert split_tokens == one_tokens
    assert split_logprobs == pytest.approx(one_logprobs, abs=1e-3)
    chunks = list(client.chat.completions.create(model="tiny-split", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"

    # The replica's placement group (the planner's bundles) spans both nodes, and so do vLLM's workers.
    # Read from the GCS tables: the state API needs the dashboard, which this cluster does not run.
    groups = [g for g in ray.util.placement_group_table().values()
              if g["state"] == "CREATED" and any("cpu_device" in b for b in g["bundles"].values())]
    assert len(groups) == 1
    assert list(groups[0]["bundles"].values()) == [{"CPU": 0.5, "cpu_device": 1.0}, {"cpu_device": 1.0}]
    assert set(groups[0]["bundles_to_node_id"].values()) == nodes
    actors = ray._private.state.actors().values()
    worker_nodes = sorted(a["Address"]["NodeID"] for a in actors
                          if a["ActorClassName"] == "CpuRayWorkerWrapper" and a["State"] == "ALIVE")
    print("vLLM Ray workers on nodes", worker_nodes)
    assert len(worker_nodes) == 2 and set(worker_nodes) == nodes

    # The second node dies mid-stream: the client's stream ends with an error instead of hanging (vLLM alone would
    # hang: it stops its executor but never fails the engine), /health names the model, and once a node is back
    # Serve's replacement replica serves the same answers.
    stream = client.completions.create(model="tiny-split", prompt="go", max_tokens=240, stream=True, timeout=300,
                                       extra_body={"ignore_eos": True})
    received = [next(iter(stream))]
    two_node_cluster.remove_node(next(iter(two_node_cluster.worker_nodes)), allow_graceful=False)
    lost = time.monotonic()
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for chunk in stream:
            received.append(chunk)
    record_property("stream_error_after_node_loss_s", round(time.monotonic() - lost))
    assert len(received) < 240
    deadline = time.monotonic() + 120
    while not named_unhealthy(health := get_through_reloads(f"{base_url}/health"), "tiny-split"):
        assert time.monotonic() < deadline, f"{health.text}\n{serve_state(two_node_cluster, 'tiny-split')}"
        time.sleep(1)
    assert set(health.json()["models"]) == {"tiny-split"}, health.text  # the model on the head node still serves
    record_property("health_names_it_after_node_loss_s", round(time.monotonic() - lost))
    two_node_cluster.add_device_node()
    back = time.monotonic()
    deadline = back + REPLACEMENT_WAIT_S
    while True:
        try:  # each try bounded by what is left of the wait
            bounded = client.with_options(timeout=max(deadline - time.monotonic(), 1))
            assert greedy(bounded, "tiny-split", prompt) == (split_tokens, split_logprobs)
            break
        except openai.APIError as e:
            assert time.monotonic() < deadline, (f"no replacement replica served within {REPLACEMENT_WAIT_S} s of the "
                                                 f"node's return ({e!r})\n"
                                                 f"{serve_state(two_node_cluster, 'tiny-split')}")
            time.sleep(5)
    record_property("serving_again_after_node_back_s", round(time.monotonic() - back))
