"""Unit tests for the placement layout planner (no Ray cluster needed)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import types

import pytest

from app.layout import (
    Layout,
    LayoutError,
    LayoutRequest,
    NodeSpec,
    Topology,
    main,
    nearest_layouts,
    plan_layout,
    replica_bundles,
    topology_from_ray,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
TWO_BY_EIGHT = "cluster has 2 nodes: node-0 8 GPUs, node-1 8 GPUs (16 total)"
UNEVEN = Topology((NodeSpec("node-a", 8), NodeSpec("node-b", 4), NodeSpec("node-c", 4)))


def plan(topology: Topology, **request) -> Layout:
    return plan_layout(topology, LayoutRequest(**request))


def plan_error(topology: Topology, **request) -> str:
    with pytest.raises(LayoutError) as error:
        plan(topology, **request)
    return str(error.value)


def test_one_gpu_is_one_bundle_with_the_replica_cpu():
    layout = plan(Topology.uniform(1, 1))
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size, layout.world_size) == (1, 1, 1)
    assert layout.bundles == [{"CPU": 1.0, "GPU": 1}]
    assert layout.strategy == "STRICT_PACK"
    assert layout.nodes == ["node-0"]
    assert plan(Topology.uniform(1, 1), tensor_parallel_size=1).bundles == layout.bundles


def test_tp8_on_one_node_of_8():
    layout = plan(Topology.uniform(1, 8), tensor_parallel_size=8)
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (8, 1)
    assert layout.bundles == [{"CPU": 1.0, "GPU": 1}] + [{"GPU": 1}] * 7
    assert layout.strategy == "STRICT_PACK"
    assert layout.nodes == ["node-0"]


def test_total_that_fits_one_node_is_all_tensor_parallel():
    layout = plan(Topology.uniform(1, 8), total_gpus=4)
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (4, 1)
    assert len(layout.bundles) == 4
    assert layout.strategy == "STRICT_PACK"


def test_tp16_on_two_nodes_of_8_becomes_tp8_pp2():
    layout = plan(Topology.uniform(2, 8), tensor_parallel_size=16)
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size, layout.world_size) == (8, 2, 16)
    assert "tensor_parallel_size=16 exceeds the 8 GPUs of any node" in layout.reason
    assert "TP=8 x PP=2 across 2 nodes" in layout.reason
    assert layout.strategy == "PACK"
    assert len(layout.bundles) == 16
    assert layout.bundles[0] == {"CPU": 1.0, "GPU": 1}
    assert all(bundle == {"GPU": 1} for bundle in layout.bundles[1:])
    assert layout.nodes == ["node-0", "node-1"]


def test_total_16_on_two_nodes_of_8_is_tp8_pp2():
    layout = plan(Topology.uniform(2, 8), total_gpus=16)
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (8, 2)
    assert layout.strategy == "PACK"


def test_tp8_pp4_on_four_nodes_puts_one_stage_per_node_in_order():
    layout = plan(Topology.uniform(4, 8), tensor_parallel_size=8, pipeline_parallel_size=4)
    assert layout.world_size == 32 and len(layout.bundles) == 32
    assert layout.nodes == ["node-0", "node-1", "node-2", "node-3"]
    assert layout.strategy == "PACK"


def test_explicit_pp1_stays_on_one_node():
    layout = plan(Topology.uniform(2, 8), tensor_parallel_size=8, pipeline_parallel_size=1)
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (8, 1)
    assert layout.strategy == "STRICT_PACK"
    assert layout.nodes == ["node-0"]


def test_stages_share_a_node_that_has_room():
    layout = plan(Topology.uniform(1, 8), tensor_parallel_size=4, pipeline_parallel_size=2)
    assert layout.nodes == ["node-0", "node-0"]
    assert layout.strategy == "STRICT_PACK"


def test_uneven_nodes_tp4_pp2_fits_on_the_big_node():
    # The 8-GPU node holds both 4-GPU stages, so the whole group is one node: STRICT_PACK is safe.
    layout = plan(UNEVEN, tensor_parallel_size=4, pipeline_parallel_size=2)
    assert layout.nodes == ["node-a", "node-a"]
    assert layout.strategy == "STRICT_PACK"


def test_uneven_nodes_total_16_uses_tp4_over_all_nodes():
    # TP=8 x PP=2 needs two 8-GPU nodes; only TP=4 gives equal stages that fit: 2 on node-a, 1 each on b, c.
    layout = plan(UNEVEN, total_gpus=16)
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (4, 4)
    assert layout.nodes == ["node-a", "node-a", "node-b", "node-c"]
    assert layout.strategy == "PACK"


def test_uneven_nodes_cannot_hold_two_stages_of_8():
    message = plan_error(UNEVEN, tensor_parallel_size=8, pipeline_parallel_size=2)
    assert "only 1 such stages fit" in message
    assert "node-a 8 GPUs, node-b 4 GPUs, node-c 4 GPUs (16 total)" in message
    assert "valid layouts near this request: TP=4 x PP=4" in message


def test_pp_without_tp_takes_the_largest_tp_that_places():
    layout = plan(Topology.uniform(2, 8), pipeline_parallel_size=2)
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (8, 2)


def test_tp_with_total_derives_pp():
    layout = plan(Topology.uniform(2, 8), tensor_parallel_size=4, total_gpus=16)
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (4, 4)
    assert layout.nodes == ["node-0", "node-0", "node-1", "node-1"]


def test_per_node_counts_win_over_tp():
    layout = plan(Topology.uniform(2, 8), tensor_parallel_size=4, gpus_per_node=[8, 8])
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (8, 2)
    assert "per-node counts win over tensor_parallel_size=4" in layout.reason
    assert layout.nodes == ["node-0", "node-1"]


def test_per_node_counts_without_conflict_say_nothing_about_winning():
    layout = plan(Topology.uniform(2, 8), gpus_per_node=[8, 8])
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size) == (8, 2)
    assert "win" not in layout.reason


def test_unequal_per_node_counts_are_refused():
    message = plan_error(Topology.uniform(2, 8), gpus_per_node=[8, 4])
    assert "uneven" in message and "same tensor_parallel_size in every pipeline stage" in message
    assert TWO_BY_EIGHT in message


def test_total_that_does_not_split_into_per_node_stages():
    message = plan_error(Topology.uniform(2, 8), total_gpus=12)
    assert "total_gpus=12 does not divide into equal per-node pipeline stages" in message
    assert TWO_BY_EIGHT in message
    assert "valid layouts near this request: TP=4 x PP=3" in message


def test_more_gpus_than_the_cluster_has():
    message = plan_error(Topology.uniform(2, 8), total_gpus=24)
    assert "more than the 16 GPUs in the cluster" in message
    assert TWO_BY_EIGHT in message
    assert "valid layouts near this request: TP=8 x PP=2, TP=4 x PP=4" in message


def test_explicit_sizes_bigger_than_the_cluster():
    message = plan_error(Topology.uniform(2, 8), tensor_parallel_size=8, pipeline_parallel_size=4)
    assert "needs 32 GPUs (TP=8 x PP=4) but the cluster has only 16" in message
    assert "TP=8 x PP=2" in message


def test_tp_that_fits_no_node_with_pp_fixed():
    message = plan_error(Topology.uniform(2, 8), tensor_parallel_size=16, pipeline_parallel_size=1)
    assert "tensor_parallel_size=16 does not fit on any node" in message
    assert "pipeline_parallel_size=1 is fixed" in message
    assert TWO_BY_EIGHT in message
    assert "valid layouts near this request: TP=8 x PP=2, TP=4 x PP=4" in message


def test_stages_that_do_not_pack_onto_nodes():
    message = plan_error(Topology.uniform(2, 8), tensor_parallel_size=5, pipeline_parallel_size=3)
    assert "cannot place 3 pipeline stages of TP=5" in message and TWO_BY_EIGHT in message


def test_tp_pp_and_total_that_contradict():
    message = plan_error(Topology.uniform(2, 8), tensor_parallel_size=8, pipeline_parallel_size=2, total_gpus=8)
    assert "total_gpus=8 contradicts TP=8 x PP=2" in message


@pytest.mark.parametrize("request_", [
    {"tensor_parallel_size": 0}, {"tensor_parallel_size": -8}, {"pipeline_parallel_size": 0},
    {"total_gpus": -1}, {"gpus_per_node": [8, 0]}, {"gpus_per_node": []}, {"replica_cpus": -1.0},
])
def test_zero_or_negative_sizes(request_):
    message = plan_error(Topology.uniform(2, 8), **request_)
    assert TWO_BY_EIGHT in message and "valid layouts near this request: TP=1 x PP=1" in message


@pytest.mark.parametrize("topology", [Topology(()), Topology((NodeSpec("cpu-only", 0),))])
def test_empty_cluster_says_no_gpus_were_found(topology):
    message = plan_error(topology, tensor_parallel_size=1)
    assert message.startswith("no GPUs were found")


def test_layout_error_is_a_value_error():
    assert issubclass(LayoutError, ValueError)


def test_bundles_follow_accelerator_and_cpu_settings():
    layout = plan(Topology.uniform(1, 4), total_gpus=2, accelerator="TPU", replica_cpus=2.0)
    assert layout.bundles == [{"CPU": 2.0, "TPU": 1}, {"TPU": 1}]
    assert layout.reason.startswith("total_gpus=2")
    # A zero-valued resource is not a valid bundle entry, so no CPU is reserved at all.
    assert replica_bundles(2, replica_cpus=0) == [{"GPU": 1}, {"GPU": 1}]


def test_to_dict_is_json():
    data = json.loads(json.dumps(plan(Topology.uniform(2, 8), tensor_parallel_size=16).to_dict()))
    assert data["world_size"] == 16 and data["strategy"] == "PACK" and data["nodes"] == ["node-0", "node-1"]


def test_nearest_layouts_prefer_fewer_stages():
    assert nearest_layouts(Topology.uniform(2, 8), 16, limit=2) == ["TP=8 x PP=2", "TP=4 x PP=4"]


def fake_ray(nodes: list[dict]) -> types.ModuleType:
    module = types.ModuleType("ray")
    module.nodes = lambda: nodes
    module.init = lambda **kwargs: None
    return module


def test_topology_from_ray_keeps_alive_nodes_with_the_accelerator(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", fake_ray([
        {"NodeID": "head", "Alive": True, "Resources": {"CPU": 8.0}},
        {"NodeID": "gpu-1", "Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0}},
        {"NodeID": "gpu-2", "Alive": False, "Resources": {"GPU": 8.0}},
        {"NodeID": "gpu-3", "Alive": True, "Resources": {"GPU": 4.0}},
    ]))
    assert topology_from_ray() == Topology((NodeSpec("gpu-1", 8), NodeSpec("gpu-3", 4)))


def test_cli_prints_the_layout_as_json(capsys):
    assert main(["--nodes", "2", "--gpus-per-node", "8", "--tp", "16"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["tensor_parallel_size"], data["pipeline_parallel_size"]) == (8, 2)
    assert data["strategy"] == "PACK" and len(data["bundles"]) == 16
    assert data["nodes"] == ["node-0", "node-1"] and "exceeds" in data["reason"]


def test_cli_exits_2_on_an_impossible_request(capsys):
    assert main(["--nodes", "2", "--gpus-per-node", "8", "--gpus", "24"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert TWO_BY_EIGHT in captured.err and "valid layouts near this request" in captured.err


def test_cli_reads_the_live_cluster_without_a_topology(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", fake_ray([{"NodeID": "n1", "Alive": True, "Resources": {"GPU": 4.0}}]))
    assert main(["--gpus", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"] == ["n1"]


def test_cli_needs_nodes_and_gpus_per_node_together(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--nodes", "2"])
    assert exit_.value.code == 2


def test_importing_the_module_does_not_import_ray():
    code = "import app.layout, sys; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
