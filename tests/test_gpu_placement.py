"""On a real multi-node Ray cluster, the engine deployment's placement group lands where the planner promised.

The nodes declare logical GPUs (Ray schedules on the count; no CUDA is touched). A probe class takes the
engine's place with exactly the deployment options the builder computes, and reports its placement group.
"""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.integration

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from conftest import local_ray_cluster  # noqa: E402

from app.builder import gpu_engine  # noqa: E402
from app.config import ModelSpec  # noqa: E402
from app.layout import plan_layout, topology_from_ray  # noqa: E402


class PlacementProbe:
    """Stands in for EngineServer: same placement, reports where its bundles went."""

    def __init__(self):
        from ray.util import get_current_placement_group, placement_group_table

        pg = get_current_placement_group()
        table = placement_group_table(pg)
        self.report = {
            "bundles": [table["bundles"][i] for i in sorted(table["bundles"])],
            "bundle_nodes": [table["bundles_to_node_id"][i] for i in sorted(table["bundles_to_node_id"])],
            "strategy": table["strategy"],
            "replica_node": ray.get_runtime_context().get_node_id(),
        }

    def __call__(self) -> dict:
        return self.report


# Replicas cannot import this test module: ship the probe class by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def two_gpu_nodes():
    cluster = local_ray_cluster(num_cpus=1, num_gpus=0)
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_tp4_on_two_nodes_of_two_becomes_tp2_pp2_across_both_nodes(two_gpu_nodes):
    spec = ModelSpec(name="big", source="unused", backend="gpu", tensor_parallel_size=4,
                     deployment={"num_cpus": 0.5})
    overrides, options = gpu_engine(spec)
    assert overrides["tensor_parallel_size"] == 2 and overrides["pipeline_parallel_size"] == 2
    assert overrides["distributed_executor_backend"] == "ray"
    assert options["ray_actor_options"]["num_gpus"] == 0  # GPUs belong to vLLM's workers, not the replica

    promised = plan_layout(topology_from_ray(), spec.layout_request())
    handle = serve.run(serve.deployment(PlacementProbe, name="probe", **options).bind(), name="probe",
                       route_prefix=None)
    report = handle.remote().result(timeout_s=120)

    assert report["strategy"] == "PACK"
    assert report["bundles"][0] == {"CPU": 0.5, "GPU": 1.0}
    assert all(b == {"GPU": 1.0} for b in report["bundles"][1:]) and len(report["bundles"]) == 4
    stage_nodes = [report["bundle_nodes"][0], report["bundle_nodes"][2]]
    assert report["bundle_nodes"] == [stage_nodes[0]] * 2 + [stage_nodes[1]] * 2  # TP stays inside a node
    assert stage_nodes[0] != stage_nodes[1]  # PP goes across nodes
    assert sorted(stage_nodes) == sorted(promised.nodes)
    assert report["replica_node"] == report["bundle_nodes"][0]  # the replica sits in bundle 0
    serve.delete("probe")


def test_single_gpu_model_needs_no_placement_group(two_gpu_nodes):
    spec = ModelSpec(name="small", source="unused", backend="gpu")
    overrides, options = gpu_engine(spec)
    assert "placement_group_bundles" not in options and options["ray_actor_options"]["num_gpus"] == 1
    assert overrides["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in overrides


def test_impossible_layout_fails_at_build_time_naming_the_topology(two_gpu_nodes):
    from app.builder import ConfigError

    spec = ModelSpec(name="huge", source="unused", backend="gpu", tensor_parallel_size=8, pipeline_parallel_size=1)
    with pytest.raises(ConfigError, match=r"2 nodes.*4 total"):
        gpu_engine(spec)
