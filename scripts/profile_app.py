"""Where the app's CPU goes under load: per-process CPU time during a streaming chat benchmark, and py-spy
profiles of the busiest Python processes.

    .venv/bin/python scripts/profile_app.py [--config serve_configs/cpu.yaml] [--streams 16] [--prompts 480]

Starts the app the README way, waits for /health, runs vLLM's benchmark client (`scripts/bench.py`'s
`chat_bench`) while py-spy samples the router and the chat engine replica (`--spy`), and prints CPU µs per output
token for every process (not summed by role, so that Ray's own processes are told apart). Writes the py-spy
collapsed stacks and a JSON summary into a temporary folder it names.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import psutil

from bench import chat_bench
from launch import ROOT, cpu_seconds_by, process_role, running, serve_run, us_per_token


def by_process(root: psutil.Process):
    """A reading's key for one process: its role and the start of its command line (Ray's processes told apart)."""
    return lambda proc: f"{process_role(proc, root)} | {' '.join(proc.cmdline())[:90]}"


def top_frames(collapsed: str) -> list[tuple[float, str]]:
    """(share of samples that include the frame, frame) from py-spy's collapsed stacks, most included first."""
    counts: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        for frame in set(stack.split(";")):
            counts[frame] = counts.get(frame, 0) + int(n)
    return sorted(((100 * c / total, f) for f, c in counts.items()), reverse=True) if total else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=pathlib.Path, default=ROOT / "serve_configs" / "cpu.yaml")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=480)
    parser.add_argument("--spy", default="ingress,tiny-chat", help="roles to sample with py-spy (comma list, or '')")
    args = parser.parse_args()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="profile-"))
    bench_args = argparse.Namespace(input_len=64, output_len=64)
    with running(serve_run(args.config, workdir)) as server:
        time.sleep(5)
        root = psutil.Process(server.process.pid)
        key = by_process(root)
        before = cpu_seconds_by(server.processes(), key)
        spy = pathlib.Path(sys.executable).parent / "py-spy"
        spies = [subprocess.Popen([str(spy), "record", "-p", str(proc.pid), "-r", "200", "-d", "15", "--nonblocking",
                                   "-f", "raw", "-o", str(workdir / f"{role.replace(' ', '_')}.txt")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for proc in server.processes() if spy.exists()
                 and (role := process_role(proc, root)) in filter(None, args.spy.split(","))]
        started = time.monotonic()
        result = chat_bench(server.url, workdir, "profile", bench_args, args.streams, args.prompts)
        elapsed = time.monotonic() - started
        after = cpu_seconds_by(server.processes(), key)
        for process in spies:
            process.wait(timeout=60)
    tokens = result["completed"] * bench_args.output_len
    rows = us_per_token(before, after, tokens)
    print(json.dumps(result))
    print(f"{elapsed:.1f} s, {tokens} tokens; CPU µs per output token by process:")
    for label, us in rows.items():
        if us >= 0.5:
            print(f"{us:8.1f}  {label}")
    for stacks in sorted(workdir.glob("*.txt")):
        print(f"\n{stacks.stem}: functions in most samples (inclusive %)")
        for share, frame in top_frames(stacks.read_text())[:25]:
            print(f"{share:5.1f}%  {frame}")
    (workdir / "summary.json").write_text(json.dumps({"result": result, "us_per_token": rows}, indent=1))
    print(f"profiles in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
