"""A/B benchmark of this app against an earlier revision of itself, in one run on this machine.

Each round starts the app of each revision in turn (a git worktree of REV for the baseline, run with this venv)
with the same config the README way, waits until `/health` says every model serves, then drives streaming chat
with vLLM's benchmark client (`scripts/bench.py`'s `chat_benches`) and reads the idle Serve controller's CPU.
Rounds alternate the order. Writes benchmarks/<name>.json and .md.

    .venv/bin/python scripts/ab.py --baseline 0634b32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

from bench import chat_benches, measure, ratio
from launch import ROOT, Server, free_port, haproxy_ports, serve_config_on_port


def worktree(rev: str, workdir: pathlib.Path) -> pathlib.Path:
    """A checkout of `rev` beside this one, sharing the generated models."""
    path = workdir / f"tree-{rev}"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True,
                   capture_output=True)
    (path / "models").symlink_to(ROOT / "models")
    return path


def app_server(tree: pathlib.Path, config: pathlib.Path, workdir: pathlib.Path, label: str) -> Server:
    """`serve run` of `tree`'s app (its own code first on every process's path) with this venv."""
    port = free_port()
    copy = serve_config_on_port(tree / config.relative_to(ROOT), port, workdir / label)
    env = {**serve_env(tree), **haproxy_ports(), "PYTHONPATH": str(tree)}
    serve = pathlib.Path(sys.executable).parent / "serve"
    server = Server([str(serve), "run", "--address", "local", "--app-dir", str(tree), str(copy)],
                    f"http://127.0.0.1:{port}", workdir / f"{label}.log", env=env)
    return server


def serve_env(tree: pathlib.Path) -> dict[str, str]:
    """What `tree`'s own launcher sets where Ray starts (its `make serve`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{tree.name}", tree / "scripts" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SERVE_ENV


def controller_cpu_pct(server: Server, seconds: float = 30) -> float:
    """Serve's controller's CPU (% of one core) over `seconds` while the app is idle."""
    procs = [p for p in psutil.Process(server.process.pid).children(recursive=True)
             if "ServeController" in " ".join(p.cmdline())]
    before = sum(sum(p.cpu_times()[:2]) for p in procs)
    time.sleep(seconds)
    return round((sum(sum(p.cpu_times()[:2]) for p in procs) - before) / seconds * 100, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the earlier revision (a git rev)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", type=pathlib.Path, default=ROOT / "serve_configs" / "cpu.yaml")
    parser.add_argument("--num-prompts", type=int, default=160)
    parser.add_argument("--concurrency", default="16,1")
    parser.add_argument("--single-stream-prompts", type=int, default=30)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--name", default="ab")
    args = parser.parse_args()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="ab-"))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    trees = {"baseline": worktree(args.baseline, workdir), "head": ROOT}
    progress = lambda message: print(f"[ab {time.strftime('%H:%M:%S')}] {message}", flush=True)  # noqa: E731
    runs = []
    try:
        for round_ in range(1, args.rounds + 1):
            for system in trees if round_ % 2 else reversed(trees):
                label = f"{system}-{round_}"
                (workdir / label).mkdir()
                server = app_server(trees[system], args.config, workdir, label)

                def work(url, server=server, label=label):
                    return {"controller_idle_cpu_pct": controller_cpu_pct(server),
                            **chat_benches(url, workdir / label, label, args)}

                runs.append({"system": system, "round": round_, **measure(label, server, work, progress)})
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(trees["baseline"])], cwd=ROOT)
    report = {"baseline": args.baseline, "head": head, "config": str(args.config.relative_to(ROOT)), "runs": runs,
              "mean": summary(runs), "cores": os.cpu_count()}
    out = ROOT / "benchmarks" / args.name
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


KEYS = ("output_throughput", "p50_ttft_ms", "p50_tpot_ms")


def levels(result: dict) -> list[str]:
    """The concurrency levels measured ("c16", "c1")."""
    return [k for k in result if k[0] == "c" and k[1:].isdigit()]


def summary(runs: list[dict]) -> dict:
    means = {}
    for system in ("baseline", "head"):
        mine = [r for r in runs if r["system"] == system]
        means[system] = {"controller_idle_cpu_pct": round(statistics.mean(r["controller_idle_cpu_pct"] for r in mine), 2)}
        for level in levels(mine[0]):
            means[system][level] = {k: round(statistics.mean(r[level][k] for r in mine), 2) for k in KEYS}
    means["head/baseline"] = {level: {k: ratio(means["head"][level][k], means["baseline"][level][k]) for k in KEYS}
                              for level in levels(means["head"])}
    return means


def markdown(report: dict) -> str:
    rows = [f"# A/B: HEAD {report['head']} against {report['baseline']}, {report['config']}, {report['cores']} cores",
            "", "| system | round | streams | output tok/s | TTFT p50 ms | TPOT p50 ms | idle controller CPU % |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        for level in levels(r):
            c = r[level]
            rows.append(f"| {r['system']} | {r['round']} | {level[1:]} | {c['output_throughput']} | {c['p50_ttft_ms']} "
                        f"| {c['p50_tpot_ms']} | {r['controller_idle_cpu_pct']} |")
    rows += ["", "| head / baseline (means) | output tok/s | TTFT p50 | TPOT p50 |", "| --- | --- | --- | --- |"]
    for level, ratios in report["mean"]["head/baseline"].items():
        rows.append(f"| {level[1:]} streams | {ratios['output_throughput']} | {ratios['p50_ttft_ms']} | "
                    f"{ratios['p50_tpot_ms']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
