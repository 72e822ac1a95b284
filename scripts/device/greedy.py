"""Greedy token ids and logprobs of a running OpenAI-compatible server, for comparing two servers of one model.

Usage: python scripts/device/greedy.py --base-url http://127.0.0.1:8000/v1 --model NAME > out.json
       python scripts/device/greedy.py --compare a.json b.json     # exit 1 unless ids match and logprobs agree
"""

from __future__ import annotations

import argparse
import json
import sys

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]


def collect(base_url: str, model: str) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none", timeout=120, max_retries=0)
    out = {}
    for prompt in PROMPTS:
        choice = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0, logprobs=1,
                                           extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]
        out[prompt] = {"token_ids": choice.token_ids, "logprobs": choice.logprobs.token_logprobs}
    return out


def compare(a: dict, b: dict, tolerance: float = 1e-3) -> dict:
    report = {}
    for prompt in a:
        ids_equal = a[prompt]["token_ids"] == b[prompt]["token_ids"]
        diff = max(abs(x - y) for x, y in zip(a[prompt]["logprobs"], b[prompt]["logprobs"]))
        report[prompt] = {"token_ids_equal": ids_equal, "max_logprob_diff": diff,
                          "ok": ids_equal and diff <= tolerance}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url")
    parser.add_argument("--model")
    parser.add_argument("--compare", nargs=2)
    args = parser.parse_args()
    if args.compare:
        a, b = (json.load(open(p)) for p in args.compare)
        report = compare(a, b)
        print(json.dumps(report, indent=2))
        return 0 if all(r["ok"] for r in report.values()) else 1
    print(json.dumps(collect(args.base_url, args.model), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
