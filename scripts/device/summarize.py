"""Summarizes `vllm bench serve` result files into benchmarks/gpu-h100-single.json.

Usage: python scripts/device/summarize.py RUN=PATH ... [--ratio APP_RUN/VLLM_RUN ...] > OUT.json
Each RUN is a label, PATH a JSON written by `vllm bench serve --save-result`.
"""

from __future__ import annotations

import json
import sys

KEYS = (
    "output_throughput", "request_throughput", "completed", "failed", "num_prompts", "max_concurrency",
    "duration", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
    "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms",
)


def main(argv: list[str]) -> int:
    runs, ratios, it = {}, {}, iter(argv)
    for arg in it:
        if arg == "--ratio":
            num, den = next(it).split("/")
            ratios[f"{num}/{den}"] = None
            continue
        label, path = arg.split("=", 1)
        with open(path) as f:
            raw = json.load(f)
        runs[label] = {k: round(raw[k], 3) if isinstance(raw[k], float) else raw[k] for k in KEYS}
    for key in ratios:
        num, den = key.split("/")
        ratios[key] = round(runs[num]["output_throughput"] / runs[den]["output_throughput"], 3)
    json.dump({"runs": runs, "output_throughput_ratios": ratios}, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
