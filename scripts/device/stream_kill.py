"""A streaming completion that SIGKILLs a process part-way through, and records what the client then gets.

For the failure run of issue 15: the process is the raylet of the Ray node holding one pipeline stage. The client
is plain `http.client` with a socket timeout, so a hang shows up as `timeout` after `--read-timeout` seconds
without a byte instead of blocking the run. Prints one JSON object: chunks before and after the kill, the last
lines received, how the stream ended (`done`, `closed`, `error`, `timeout`) and the time from the kill to that end.

Usage: python scripts/device/stream_kill.py --url http://127.0.0.1:8000 --model NAME --kill-pid PID
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import time
from urllib.parse import urlparse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--kill-pid", type=int, required=True)
    parser.add_argument("--kill-after-chunks", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument("--read-timeout", type=float, default=90)
    parser.add_argument("--wall-limit", type=float, default=240)
    args = parser.parse_args()

    url = urlparse(args.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=args.read_timeout)
    body = {"model": args.model, "prompt": "Once upon a time", "max_tokens": args.max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True}
    started = time.monotonic()
    result: dict = {"chunks_before_kill": 0, "chunks_after_kill": 0, "killed_at_s": None, "end": None}
    last_lines: list[str] = []
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        result["status"] = response.status
        while True:
            if time.monotonic() - started > args.wall_limit:
                result["end"] = "wall_limit"
                break
            line = response.readline()
            if not line:
                result["end"] = "closed"
                break
            text = line.decode(errors="replace").strip()
            if not text:
                continue
            last_lines = (last_lines + [text[:300]])[-5:]
            if text == "data: [DONE]":
                result["end"] = "done"
                break
            if '"error"' in text:
                result["error_event"] = text[:500]
            if result["killed_at_s"] is None:
                result["chunks_before_kill"] += 1
                if result["chunks_before_kill"] >= args.kill_after_chunks:
                    os.kill(args.kill_pid, signal.SIGKILL)
                    result["killed_at_s"] = round(time.monotonic() - started, 3)
                    result["killed_at_epoch"] = round(time.time(), 3)
                    kill_time = time.monotonic()
            else:
                result["chunks_after_kill"] += 1
    except TimeoutError:
        result["end"] = "timeout"
    except (http.client.HTTPException, OSError) as e:
        result["end"] = "error"
        result["exception"] = f"{type(e).__name__}: {e}"
    result["elapsed_s"] = round(time.monotonic() - started, 3)
    result["ended_at_epoch"] = round(time.time(), 3)
    if result["killed_at_s"] is not None:
        result["kill_to_end_s"] = round(time.monotonic() - kill_time, 3)
    result["last_lines"] = last_lines
    print(json.dumps(result, indent=2))
    return 0 if result["killed_at_s"] is not None and result["end"] != "timeout" else 1


if __name__ == "__main__":
    sys.exit(main())
