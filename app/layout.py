"""Placement layout planner: tensor/pipeline parallel sizes and Ray placement-group bundles for one replica.

Tensor parallelism (TP) stays inside a node; pipeline parallelism (PP) spans nodes. Given the cluster's
accelerators per node and what the user asked for (TP, PP, a total, or explicit per-node counts), the
planner picks TP x PP, the bundles that vLLM's Ray executor expects, the placement strategy and the node
each pipeline stage should land on, or raises `LayoutError` naming the topology and nearby valid layouts
before anything starts. Pure Python: Ray is imported only by `topology_from_ray` and the CLI.

    python -m app.layout --nodes 2 --gpus-per-node 8 --tp 16
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass


class LayoutError(ValueError):
    """The request cannot be placed on this cluster."""


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    gpus: int


@dataclass(frozen=True)
class Topology:
    nodes: tuple[NodeSpec, ...]

    @classmethod
    def uniform(cls, nodes: int, gpus_per_node: int) -> Topology:
        if nodes < 0 or gpus_per_node < 0:
            raise LayoutError(f"node and GPU counts cannot be negative, got {nodes} nodes x {gpus_per_node} GPUs")
        return cls(tuple(NodeSpec(f"node-{i}", gpus_per_node) for i in range(nodes)))

    @property
    def total_gpus(self) -> int:
        return sum(node.gpus for node in self.nodes)

    @property
    def largest_node(self) -> int:
        return max((node.gpus for node in self.nodes), default=0)

    def describe(self, accelerator: str = "GPU") -> str:
        if not self.nodes:
            return f"cluster has no nodes with {accelerator}s"
        listed = ", ".join(f"{node.node_id} {node.gpus} {accelerator}s" for node in self.nodes[:8])
        more = f", and {len(self.nodes) - 8} more" if len(self.nodes) > 8 else ""
        plural = "node" if len(self.nodes) == 1 else "nodes"
        return f"cluster has {len(self.nodes)} {plural}: {listed}{more} ({self.total_gpus} total)"


@dataclass(frozen=True)
class LayoutRequest:
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    total_gpus: int | None = None
    gpus_per_node: list[int] | None = None  # stage i uses gpus_per_node[i] GPUs; wins over TP
    accelerator: str = "GPU"
    replica_cpus: float = 1.0


@dataclass(frozen=True)
class Layout:
    tensor_parallel_size: int
    pipeline_parallel_size: int
    bundles: list[dict[str, float]]
    strategy: str
    nodes: list[str]  # expected node of each pipeline stage, in stage order
    reason: str = ""

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def to_dict(self) -> dict:
        return {**asdict(self), "world_size": self.world_size}


def plan_layout(topology: Topology, request: LayoutRequest) -> Layout:
    """The layout for `request` on `topology`; raises LayoutError when no valid layout exists."""
    _check_request(topology, request)
    tp, pp, reason = _resolved_sizes(topology, request)
    if tp * pp > topology.total_gpus:
        raise _layout_error(
            f"the request needs {tp * pp} {request.accelerator}s (TP={tp} x PP={pp}) "
            f"but the cluster has only {topology.total_gpus}", topology, request, tp * pp, tp, pp)
    nodes = stage_nodes(topology, tp, pp)
    if nodes is None:
        raise _layout_error(
            f"cannot place {pp} pipeline stages of TP={tp}: each stage needs {tp} {request.accelerator}s "
            f"on one node and only {_stage_capacity(topology, tp)} such stages fit",
            topology, request, tp * pp, tp, pp)
    return Layout(tp, pp, replica_bundles(tp * pp, request.accelerator, request.replica_cpus),
                  placement_strategy(nodes), nodes, reason)


def replica_bundles(world_size: int, accelerator: str = "GPU", replica_cpus: float = 1.0) -> list[dict[str, float]]:
    """One bundle per worker in rank (stage-major) order; the replica actor's CPU rides in bundle 0."""
    first: dict[str, float] = {"CPU": replica_cpus, accelerator: 1} if replica_cpus else {accelerator: 1}
    return [first] + [{accelerator: 1} for _ in range(world_size - 1)]


def placement_strategy(nodes: list[str]) -> str:
    # STRICT_PACK across nodes can never be satisfied (kuberay#2354). SPREAD/STRICT_SPREAD would scatter a
    # stage's TP workers over nodes; PACK fills as few nodes as possible, which keeps equal stages whole
    # (as long as each node's free GPUs are a multiple of TP; `nodes` is a plan, not a Ray guarantee).
    return "STRICT_PACK" if len(set(nodes)) == 1 else "PACK"


def stage_nodes(topology: Topology, tp: int, pp: int) -> list[str] | None:
    """The node for each of `pp` stages of `tp` GPUs, biggest nodes first (as PACK fills), or None."""
    remaining = {node.node_id: node.gpus for node in topology.nodes}
    by_size = sorted(topology.nodes, key=lambda node: -node.gpus)
    placed = []
    for _ in range(pp):
        node = next((n for n in by_size if remaining[n.node_id] >= tp), None)
        if node is None:
            return None
        remaining[node.node_id] -= tp
        placed.append(node.node_id)
    return placed


def topology_from_ray(accelerator: str = "GPU") -> Topology:
    """The live cluster's alive nodes that have `accelerator`, read from `ray.nodes()`."""
    import ray  # lazily: planning must not need Ray

    nodes = []
    for node in ray.nodes():
        count = int(node.get("Resources", {}).get(accelerator, 0))
        if node.get("Alive") and count > 0:
            nodes.append(NodeSpec(node["NodeID"], count))
    return Topology(tuple(nodes))


def nearest_layouts(topology: Topology, target: int, tp: int | None = None, pp: int | None = None,
                    limit: int = 3) -> list[str]:
    """Valid 'TP=a x PP=b' layouts closest to `target` GPUs, preferring the requested TP, then PP."""
    options = set()
    for t in _tp_candidates(topology):
        capacity = _stage_capacity(topology, t)
        for p in {target // t, -(-target // t)}:
            options.add((t, min(max(p, 1), capacity)))
    ranked = sorted(options, key=lambda o: (abs(o[0] * o[1] - target), o[0] != tp, o[1] != pp, -o[0]))
    return [f"TP={t} x PP={p}" for t, p in ranked[:limit]]


def _resolved_sizes(topology: Topology, request: LayoutRequest) -> tuple[int, int, str]:
    tp, pp, total = request.tensor_parallel_size, request.pipeline_parallel_size, request.total_gpus
    if request.gpus_per_node is not None:
        return _sizes_from_per_node(topology, request)
    if tp is not None and pp is not None:
        if total is not None and total != tp * pp:
            raise _layout_error(f"total_gpus={total} contradicts TP={tp} x PP={pp} = {tp * pp}",
                                topology, request, total, tp, pp)
        return _sizes_fixed(topology, request, tp, pp, f"TP={tp} x PP={pp} as requested")
    if tp is not None:
        if total is not None and total != tp:
            if total % tp:
                raise _layout_error(f"total_gpus={total} is not a multiple of tensor_parallel_size={tp}",
                                    topology, request, total, tp)
            return _sizes_fixed(topology, request, tp, total // tp,
                                f"total_gpus={total} / tensor_parallel_size={tp}: TP={tp} x PP={total // tp}")
        return _sizes_from_tp(topology, request, tp)
    if pp is not None:
        return _sizes_from_pp(topology, request, pp)
    if total is not None:
        return _sizes_from_total(topology, request, total)
    return 1, 1, "no size requested: one GPU, TP=1 x PP=1"


def _sizes_from_per_node(topology: Topology, request: LayoutRequest) -> tuple[int, int, str]:
    counts = list(request.gpus_per_node or [])
    if len(set(counts)) != 1:
        raise _layout_error(
            f"gpus_per_node={counts} is uneven: vLLM needs the same tensor_parallel_size in every pipeline "
            f"stage, so every entry must be equal", topology, request, sum(counts), max(counts), len(counts))
    tp, pp = counts[0], len(counts)
    reason = f"gpus_per_node={counts}: TP={tp} x PP={pp}, one stage per entry"
    overridden = [f"{name}={value}" for name, value, derived in (
        ("tensor_parallel_size", request.tensor_parallel_size, tp),
        ("pipeline_parallel_size", request.pipeline_parallel_size, pp),
        ("total_gpus", request.total_gpus, tp * pp)) if value is not None and value != derived]
    if overridden:
        reason += f" (the per-node counts win over {', '.join(overridden)})"
    return _sizes_fixed(topology, request, tp, pp, reason)


def _sizes_fixed(topology: Topology, request: LayoutRequest, tp: int, pp: int, reason: str) -> tuple[int, int, str]:
    if tp > topology.largest_node:
        raise _layout_error(
            f"tensor_parallel_size={tp} does not fit on any node (the largest has {topology.largest_node} "
            f"{request.accelerator}s) and pipeline_parallel_size={pp} is fixed; tensor parallelism must "
            f"stay inside one node", topology, request, tp * pp, tp, pp)
    return tp, pp, reason


def _sizes_from_tp(topology: Topology, request: LayoutRequest, tp: int) -> tuple[int, int, str]:
    largest = topology.largest_node
    if tp <= largest:
        return tp, 1, f"TP={tp} fits on one node: PP=1"
    for size in _node_sizes(topology):
        placed = stage_nodes(topology, size, tp // size) if tp % size == 0 else None
        if placed is not None:
            spanned = len(set(placed))
            return size, tp // size, (
                f"tensor_parallel_size={tp} exceeds the {largest} {request.accelerator}s of any node: "
                f"using TP={size} x PP={tp // size} across {spanned} nodes")
    raise _layout_error(
        f"tensor_parallel_size={tp} exceeds the {largest} {request.accelerator}s of any node and no node size "
        f"splits it into equal pipeline stages that fit", topology, request, tp)


def _sizes_from_pp(topology: Topology, request: LayoutRequest, pp: int) -> tuple[int, int, str]:
    total = request.total_gpus
    if total is not None:
        if total % pp:
            raise _layout_error(f"total_gpus={total} does not split into {pp} equal pipeline stages",
                                topology, request, total, None, pp)
        return _sizes_fixed(topology, request, total // pp, pp,
                            f"total_gpus={total} / pipeline_parallel_size={pp}: TP={total // pp} x PP={pp}")
    for tp in _tp_candidates(topology):
        if stage_nodes(topology, tp, pp) is not None:
            return tp, pp, f"pipeline_parallel_size={pp} without TP: the largest TP that places {pp} stages is {tp}"
    raise _layout_error(f"pipeline_parallel_size={pp} stages cannot be placed even with TP=1",
                        topology, request, pp, None, pp)


def _sizes_from_total(topology: Topology, request: LayoutRequest, total: int) -> tuple[int, int, str]:
    if total > topology.total_gpus:
        raise _layout_error(f"total_gpus={total} is more than the {topology.total_gpus} {request.accelerator}s "
                            f"in the cluster", topology, request, total)
    if total <= topology.largest_node:
        return total, 1, f"total_gpus={total} fits on one node: TP={total} x PP=1"
    for size in _node_sizes(topology):
        if total % size == 0 and stage_nodes(topology, size, total // size) is not None:
            return size, total // size, (
                f"total_gpus={total} does not fit on one node (the largest has {topology.largest_node}): "
                f"TP={size} per node x PP={total // size}")
    raise _layout_error(f"total_gpus={total} does not divide into equal per-node pipeline stages",
                        topology, request, total)


def _check_request(topology: Topology, request: LayoutRequest) -> None:
    if topology.total_gpus <= 0:
        raise LayoutError(f"no {request.accelerator}s were found: {topology.describe(request.accelerator)}")
    sizes = {"tensor_parallel_size": request.tensor_parallel_size,
             "pipeline_parallel_size": request.pipeline_parallel_size, "total_gpus": request.total_gpus}
    if request.gpus_per_node is not None:
        if not request.gpus_per_node:
            raise _layout_error("gpus_per_node is empty", topology, request, 1)
        sizes.update({f"gpus_per_node[{i}]": n for i, n in enumerate(request.gpus_per_node)})
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise _layout_error(f"{name} must be a positive integer, got {value!r}", topology, request, 1)
    if request.replica_cpus < 0:
        raise _layout_error(f"replica_cpus cannot be negative, got {request.replica_cpus}", topology, request, 1)


def _layout_error(problem: str, topology: Topology, request: LayoutRequest, target: int,
                  tp: int | None = None, pp: int | None = None) -> LayoutError:
    near = ", ".join(nearest_layouts(topology, target, tp, pp))
    return LayoutError(f"{problem}; {topology.describe(request.accelerator)}; valid layouts near this request: {near}")


def _node_sizes(topology: Topology) -> list[int]:
    return sorted({node.gpus for node in topology.nodes if node.gpus > 0}, reverse=True)


def _tp_candidates(topology: Topology) -> list[int]:
    """TP sizes worth considering: the divisors of some node's GPU count, largest first."""
    return sorted({d for size in _node_sizes(topology) for d in range(1, size + 1) if size % d == 0}, reverse=True)


def _stage_capacity(topology: Topology, tp: int) -> int:
    return sum(node.gpus // tp for node in topology.nodes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.layout", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, help="nodes in the cluster (default: read the live Ray cluster)")
    parser.add_argument("--gpus-per-node", type=int, help="accelerators on each node")
    parser.add_argument("--tp", type=int, help="tensor_parallel_size")
    parser.add_argument("--pp", type=int, help="pipeline_parallel_size")
    parser.add_argument("--gpus", type=int, help="total accelerators for one replica")
    parser.add_argument("--accelerator", default="GPU", help="Ray resource name of the accelerator")
    parser.add_argument("--model", help="a model folder (or cached hub id): check the layout against its shape")
    args = parser.parse_args(argv)
    if (args.nodes is None) != (args.gpus_per_node is None):
        parser.error("--nodes and --gpus-per-node go together")
    request = LayoutRequest(args.tp, args.pp, args.gpus, accelerator=args.accelerator)
    try:
        layout = plan_layout(_cli_topology(args), request)
    except LayoutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ConnectionError as error:  # ray.init(address="auto") found no cluster
        print(f"error: {error}", file=sys.stderr)
        return 1
    problem = _shape_problem(args.model, layout)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print(json.dumps(layout.to_dict(), indent=2))
    return 0


def _shape_problem(model: str | None, layout: Layout) -> str | None:
    from app.model_shape import read_model_shape

    shape = read_model_shape(model) if model else None
    return shape and shape.problem(layout.tensor_parallel_size, layout.pipeline_parallel_size)


def _cli_topology(args: argparse.Namespace) -> Topology:
    if args.nodes is not None:
        return Topology.uniform(args.nodes, args.gpus_per_node)
    import ray

    ray.init(address="auto", log_to_driver=False)
    return topology_from_ray(args.accelerator)


if __name__ == "__main__":
    sys.exit(main())
