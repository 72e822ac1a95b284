"""Polls an app's /health and a tiny completion until the completion succeeds (or a deadline), one JSON line each.

For the failure run of issue 15: started before a node is killed, it records what /health says while the
replica is gone and when the app serves again. Every line carries the wall-clock time (`epoch`), so that it lines
up with the kill and the restart recorded by other tools. The last line is a summary.

Usage: python scripts/device/recovery.py --url http://127.0.0.1:8000 --model NAME --deadline-s 300 > timeline.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def call(url: str, body: dict | None, timeout: float) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except Exception as e:  # noqa: BLE001 - any failure is a data point here
        return 0, f"{type(e).__name__}: {e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--deadline-s", type=float, default=300)
    parser.add_argument("--interval-s", type=float, default=2)
    parser.add_argument("--min-s", type=float, default=0, help="keep polling at least this long (the kill comes later)")
    args = parser.parse_args()
    started, first_fail, recovered = time.time(), None, None
    body = {"model": args.model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    while time.time() - started < args.deadline_s:
        t = time.time()
        health, health_body = call(f"{args.url}/health", None, 5)
        status, text = call(f"{args.url}/v1/completions", body, 10)
        ok = status == 200 and '"text"' in text
        if not ok and first_fail is None:
            first_fail = t
        print(json.dumps({"epoch": round(t, 3), "t": round(t - started, 1), "health": health,
                          "health_body": health_body[:300], "completion": status,
                          "completion_body": "" if ok else text[:300]}), flush=True)
        if ok and first_fail is not None and t - started >= args.min_s:
            recovered = t
            break
        time.sleep(max(0.0, args.interval_s - (time.time() - t)))
    print(json.dumps({"summary": True, "first_failure_epoch": first_fail, "recovered_epoch": recovered,
                      "failure_to_recovery_s": round(recovered - first_fail, 1) if recovered and first_fail else None}),
          flush=True)
    return 0 if recovered else 1


if __name__ == "__main__":
    sys.exit(main())
