"""CPU seconds used so far by this machine's app, engine, server and benchmark processes, summed per role, as JSON
(read before and after a benchmark: the difference over its output tokens is the CPU each part spends per token).

    python3 scripts/device/cpu_roles.py > before.json
    python3 scripts/device/cpu_roles.py diff before.json after.json bench_result.json   # µs per output token
"""

from __future__ import annotations

import json
import pathlib
import sys

import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from launch import cpu_seconds_by, process_role, us_per_token  # noqa: E402

OTHERS = {"api_server": "vllm serve", "bench serve": "benchmark client"}


def role(proc: psutil.Process, root: psutil.Process) -> str:
    command = " ".join(proc.cmdline())
    return next((name for marker, name in OTHERS.items() if marker in command), None) or process_role(proc, root)


def per_token(before: dict, after: dict, tokens: int) -> dict[str, float]:
    """CPU µs per output token of each role between two readings, busiest first (those under 0.5 left out)."""
    return {name: us for name, us in us_per_token(before, after, tokens).items() if us >= 0.5}


def main() -> None:
    if sys.argv[1:2] == ["diff"]:
        before, after, result = (json.loads(pathlib.Path(p).read_text()) for p in sys.argv[2:5])
        print(json.dumps(per_token(before, after, result["total_output_tokens"])))
        return
    root = psutil.Process(1)
    totals = cpu_seconds_by(psutil.process_iter(), lambda proc: role(proc, root))
    print(json.dumps({name: round(seconds, 2) for name, seconds in totals.items()}))


if __name__ == "__main__":
    main()
