"""Issue 25's bar, checked by a script: `.ci/run` on fresh clones of a commit, N times in a row, each green, within
a time limit, and leaving no process behind.

    .venv/bin/python scripts/ci_check.py [--runs 3] [--limit-min 15] [--rev HEAD] [--out benchmarks/ci-check.json]

Each run clones the repository into a new temporary folder (no .venv, no models: `make test` sets them up, as on a
new machine), runs `.ci/run` there, and records its exit status, wall time, pytest's summary line and the slowest
tests. `.ci/run` itself fails a run whose processes outlive it (it gives each run an id every Ray, vLLM and HAProxy
process inherits); this script also names any Ray, vLLM or HAProxy process that appeared during a run and is still
there 30 s after it. Exits 1 unless every run passed within the limit and left nothing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"^=+ (.*(?:passed|failed|error).*) in [\d.]+s", re.M)
SLOW = re.compile(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)$", re.M)


SUITE_KINDS = ("VLLM::", "raylet", "gcs_server", "ray::", "haproxy", "serve run", "vllm serve", "api_server")


def new_processes(before: set[int], grace_s: float = 30) -> dict[int, str]:
    """Ray, vLLM and HAProxy processes that did not exist before the run and are still there after a grace period."""
    deadline = time.monotonic() + grace_s
    while True:
        found = {}
        for proc in psutil.process_iter(["cmdline"]):
            command = " ".join(proc.info["cmdline"] or [])
            if proc.pid not in before and any(kind in command for kind in SUITE_KINDS):
                found[proc.pid] = command[:160]
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(2)


def one_run(rev: str, index: int) -> dict:
    folder = pathlib.Path(tempfile.mkdtemp(prefix=f"ci-check-{index}-"))
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(folder)], check=True)
        subprocess.run(["git", "-C", str(folder), "checkout", "-q", rev], check=True)
        before = {p.pid for p in psutil.process_iter()}
        started = time.monotonic()
        done = subprocess.run([str(folder / ".ci" / "run")], cwd=folder, capture_output=True, text=True)
        minutes = (time.monotonic() - started) / 60
        output = done.stdout + done.stderr
        (ROOT / "benchmarks" / "raw").mkdir(parents=True, exist_ok=True)
        (ROOT / "benchmarks" / "raw" / f"ci-check-{index}.log").write_text(output)
        summary = SUMMARY.findall(output)
        return {"run": index, "rc": done.returncode, "minutes": round(minutes, 1),
                "summary": summary[-1] if summary else None,
                "slowest": [f"{s}s {what} {test}" for s, what, test in SLOW.findall(output)[:10]],
                "left_behind": new_processes(before)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--limit-min", type=float, default=15)
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the runs as JSON here")
    args = parser.parse_args(argv)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    runs = []
    for index in range(1, args.runs + 1):
        run = one_run(rev, index)
        run["ok"] = run["rc"] == 0 and run["minutes"] <= args.limit_min and not run["left_behind"]
        runs.append(run)
        print(json.dumps(run), flush=True)
    report = {"rev": rev, "limit_min": args.limit_min, "runs": runs, "all_ok": all(r["ok"] for r in runs)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{sum(r['ok'] for r in runs)}/{len(runs)} runs green within {args.limit_min} min and leaving nothing: "
          f"{[r['minutes'] for r in runs]} min")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
