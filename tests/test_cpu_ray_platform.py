"""The CPU-under-Ray vLLM platform plugin: activation logic (fast) and one engine spread over two Ray nodes."""

from __future__ import annotations

import pathlib
import pickle
import shutil
import tempfile
import time
from importlib.metadata import entry_points

import pytest

from app import cpu_ray_platform

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_CHAT = ROOT / "models" / "tiny-chat"
ENTRY_POINT = "app.cpu_ray_platform:register"


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
    assert cpu_ray_platform.register() == "app.cpu_ray_platform.CpuRayPlatform"


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


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_tensor_parallel_engine_spans_two_ray_nodes(monkeypatch):
    """TP=2 over two virtual Ray nodes (one `cpu_device` each) gives the same greedy text as TP=1."""
    if not plugin_installed():
        pytest.skip(f"entry point {ENTRY_POINT} not installed (pip install -e .)")
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from app.layout import replica_bundles

    # Raylets (started below) pass these to every worker and to vLLM's engine-core processes.
    monkeypatch.setenv(cpu_ray_platform.ACTIVATE_ENV, "1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM's engine core is a Ray driver started inside a Ray worker; on Ray 2.60 it turns token auth on by
    # itself when ~/.ray/auth_token exists, and the GCS of this auth-less test cluster then cannot reach it.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # vLLM's Ray executor requires one IP per node; virtual nodes share the host, so give each its own.
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    node_args = {"num_cpus": 2, "resources": {"cpu_device": 1}, "include_dashboard": False}
    # A private temp dir: other Ray users on this machine (address="auto") must not find this cluster.
    temp_dir = tempfile.mkdtemp(prefix="rtcpu-")
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "temp_dir": temp_dir})
    try:
        cluster.add_node(**node_args, temp_dir=temp_dir, env_vars={"VLLM_HOST_IP": "127.0.0.2"})
        # Nested drivers (vLLM's engine core) find the cluster by RAY_ADDRESS, not by /tmp/ray's latest cluster.
        ray.init(address=cluster.address, runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}})
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2

        @ray.remote(num_cpus=0)
        class Engine:
            def __init__(self, model: str, tp: int):
                from vllm import LLM

                backend = {"distributed_executor_backend": "ray"} if tp > 1 else {}
                self.llm = LLM(model=model, tensor_parallel_size=tp, max_model_len=256, max_num_seqs=4,
                               enforce_eager=True, dtype="float32", **backend)  # fp32: exact comparison

            def greedy(self, prompt: str) -> tuple[list[int], list[float]]:
                """Greedy token ids and each one's logprob (a random tiny model repeats tokens: the logprobs
                show that both layouts compute the same function, not only the same argmax)."""
                from vllm import SamplingParams

                out = self.llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, logprobs=1))
                completion = out[0].outputs[0]
                logprobs = [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)]
                return list(completion.token_ids), logprobs

        # The bundles the app's layout planner gives a TP=2 replica, with `cpu_device` as the accelerator.
        pg = placement_group(replica_bundles(2, "cpu_device", 1.0), strategy="SPREAD")
        ray.get(pg.ready(), timeout=60)
        in_pg = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0,
                                                 placement_group_capture_child_tasks=True)
        started = time.monotonic()
        tp2 = Engine.options(scheduling_strategy=in_pg).remote(str(TINY_CHAT), 2)
        tp1 = Engine.remote(str(TINY_CHAT), 1)  # the reference, started at the same time
        prompt = "The capital of France is"
        (tp2_tokens, tp2_logprobs), (tp1_tokens, tp1_logprobs) = ray.get(
            [tp2.greedy.remote(prompt), tp1.greedy.remote(prompt)], timeout=360)
        print(f"TP=2 {tp2_tokens} TP=1 {tp1_tokens} after {time.monotonic() - started:.0f}s")
        print("logprobs TP=2", [round(x, 4) for x in tp2_logprobs])
        print("logprobs TP=1", [round(x, 4) for x in tp1_logprobs])

        # Read from the GCS actor table (the state API needs the dashboard, which this cluster does not run).
        actors = ray._private.state.actors().values()
        worker_nodes = sorted(a["Address"]["NodeID"] for a in actors
                              if a["ActorClassName"] == "CpuRayWorkerWrapper" and a["State"] == "ALIVE")
        print("vLLM Ray workers on nodes", worker_nodes)
        assert len(worker_nodes) == 2 and set(worker_nodes) == nodes
        assert len(tp2_tokens) == 16
        assert tp2_tokens == tp1_tokens
        assert tp2_logprobs == pytest.approx(tp1_logprobs, abs=1e-3)
        for actor in (tp2, tp1):
            ray.kill(actor)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
