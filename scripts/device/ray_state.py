"""Where a running app's pieces sit: Ray nodes, placement groups (bundle -> node), actors, and GPU processes.

Reads Ray's GCS tables directly (the state API needs the dashboard, which the device runs do not start) and
`nvidia-smi`, and joins them: each GPU process is matched to the Ray actor with that pid, and each node id to its IP.

Usage: python scripts/device/ray_state.py > state.json      (connects with ray.init(address="auto"))
"""

from __future__ import annotations

import json
import subprocess
import sys


def gpu_processes() -> list[dict]:
    """Compute processes per GPU index, from nvidia-smi (empty if it is missing)."""
    try:
        index = dict(line.split(", ") for line in subprocess.run(
            ["nvidia-smi", "--query-gpu=uuid,index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip().splitlines())
        apps = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory,process_name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    out = []
    for line in apps:
        pid, uuid, memory, name = (x.strip() for x in line.split(",", 3))
        out.append({"pid": int(pid), "gpu": int(index.get(uuid, -1)), "used_memory": memory, "name": name})
    return out


def process_env(pid: int, names: tuple[str, ...] = ("CUDA_VISIBLE_DEVICES", "VLLM_HOST_IP")) -> dict:
    """Some environment variables of a local process (the nodes share this host), or {} if unreadable."""
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return {}
    env = dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)
    return {name: env.get(name) for name in names}


def serve_status() -> dict | str:
    """Ray Serve's view: each deployment's status, message and replica states (through the controller)."""
    import dataclasses

    try:
        from ray import serve

        return dataclasses.asdict(serve.status())
    except Exception as e:  # noqa: BLE001 - a snapshot records what it can
        return f"{type(e).__name__}: {e}"


def main() -> int:
    import ray

    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    nodes = {n["NodeID"]: {"name": f'{n.get("NodeName")}/{n["NodeID"][:6]}', "ip": n["NodeManagerAddress"], "alive": n["Alive"],
                           "resources": n.get("Resources", {})} for n in ray.nodes()}
    groups = []
    for pg_id, g in ray.util.placement_group_table().items():
        groups.append({
            "id": pg_id, "state": g["state"], "strategy": g["strategy"],
            "bundles": list(g["bundles"].values()),
            "bundle_nodes": {str(i): node for i, node in g.get("bundles_to_node_id", {}).items()},
            "bundle_node_names": {str(i): nodes.get(node, {}).get("name") for i, node in
                                  g.get("bundles_to_node_id", {}).items()},
        })
    actors = []
    for a in ray._private.state.actors().values():
        if a["State"] == "DEAD":
            continue
        node = a["Address"]["NodeID"]
        actors.append({"class": a["ActorClassName"], "name": a["Name"], "state": a["State"], "pid": a["Pid"],
                       "node": node, "node_name": nodes.get(node, {}).get("name")})
    gpus = gpu_processes()
    by_pid = {a["pid"]: a for a in actors}
    for p in gpus:
        actor = by_pid.get(p["pid"])
        p["ray_actor"] = actor and {"class": actor["class"], "node_name": actor["node_name"]}
    workers = [a for a in actors if "Worker" in a["class"] and a["state"] == "ALIVE"]
    summary = {
        "alive_nodes": sorted(f"{v['name']} ({v['ip']}, GPU {v['resources'].get('GPU', 0):g})"
                              for v in nodes.values() if v["alive"]),
        "dead_nodes": sorted(f"{v['name']} ({v['ip']})" for v in nodes.values() if not v["alive"]),
        "created_group_bundles": [{"strategy": g["strategy"], "bundles": g["bundles"],
                                   "bundle_node_names": g["bundle_node_names"]} for g in groups if g["state"] == "CREATED"],
        "vllm_worker_actors": [(a["class"], a["node_name"], a["pid"], process_env(a["pid"])) for a in workers],
        "serve_replicas": [(a["class"], a["node_name"], a["pid"]) for a in actors
                           if a["class"].startswith("ServeReplica") and a["state"] == "ALIVE"],
        "gpu_of_each_worker_actor": {str(a["pid"]): [p["gpu"] for p in gpus if p["pid"] == a["pid"]] for a in workers},
    }
    status = serve_status()
    if isinstance(status, dict):
        summary["serve"] = {f"{app}/{dep}": (d.get("status"), (d.get("message") or "")[:400], d.get("replica_states"))
                            for app, a in status.get("applications", {}).items()
                            for dep, d in a.get("deployments", {}).items()}
    json.dump({"summary": summary, "serve_status": status, "nodes": nodes, "placement_groups": groups, "actors": actors,
               "gpu_processes": gpus}, sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
