"""Bounded soak: mixed OpenAI traffic for a few minutes; reports errors and memory growth over time.

Not part of CI. Against a running app (e.g. `make serve` in another terminal):
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8000 --minutes 5 --concurrency 8
Memory is the resident set of every Ray process on this machine (the app's whole footprint).
Exits non-zero when any request failed with a 5xx or a connection error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time

import httpx
import psutil

REQUESTS = [
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 64}),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "stream"}],
                              "max_tokens": 64, "stream": True}),
    ("/v1/completions", {"model": "tiny-chat", "prompt": ["a", "b"], "max_tokens": 32, "n": 2}),
    ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": ["one sentence", "and another"]}),
    ("/v1/chat/completions", {"model": "tiny-chat", "messages": "garbage"}),  # a 400 on purpose
]


def ray_rss_mib() -> float:
    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ray" in cmdline or "vllm" in cmdline.lower() or "serve run" in cmdline:
            total += proc.info["memory_info"].rss if proc.info["memory_info"] else 0
    return total / 2**20


async def worker(client: httpx.AsyncClient, deadline: float, stats: collections.Counter) -> None:
    while time.monotonic() < deadline:
        route, body = random.choice(REQUESTS)
        try:
            if body.get("stream"):
                async with client.stream("POST", route, json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
                    status = r.status_code
            else:
                status = (await client.post(route, json=body)).status_code
            stats[f"{status // 100}xx"] += 1
        except httpx.HTTPError as e:
            stats[f"error:{type(e).__name__}"] += 1


async def soak(url: str, minutes: float, concurrency: int, sample_s: float) -> dict:
    stats: collections.Counter = collections.Counter()
    deadline = time.monotonic() + minutes * 60
    samples = [(0.0, ray_rss_mib())]
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        workers = [asyncio.create_task(worker(client, deadline, stats)) for _ in range(concurrency)]
        while time.monotonic() < deadline:
            await asyncio.sleep(sample_s)
            samples.append((round(time.monotonic() - started), round(ray_rss_mib())))
            print(f"t={samples[-1][0]:>5}s  rss={samples[-1][1]:>7} MiB  {dict(stats)}", flush=True)
        await asyncio.gather(*workers)
    first, last = samples[1][1] if len(samples) > 1 else samples[0][1], samples[-1][1]
    return {"requests": dict(stats), "rss_mib": samples, "rss_growth_mib": round(last - first, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-s", type=float, default=15)
    parser.add_argument("--out", help="write the report as JSON here")
    args = parser.parse_args()
    report = asyncio.run(soak(args.url, args.minutes, args.concurrency, args.sample_s))
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mib"}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    bad = sum(v for k, v in report["requests"].items() if k.startswith(("5", "error")))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
