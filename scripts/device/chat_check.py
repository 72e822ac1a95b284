"""Checks a running OpenAI-compatible server end to end with the `openai` client: models, a streaming
chat completion (counts chunks and checks the usage block), a non-streaming completion. Then the raw SSE bytes
of a streaming chat and a streaming completion (plain http.client): the app's router asks vLLM for token ids
(`return_token_ids`, app/migration.py) and must hand the client none of them (`"token_ids":null` at most, as
`vllm serve` sends without the option); the keys of the first content chunk are recorded to compare with
`vllm serve`'s.

Usage: python scripts/device/chat_check.py --base-url http://127.0.0.1:8000/v1 --model NAME
Prints a JSON summary (and the streamed text); exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import time
from urllib.parse import urlparse

from openai import OpenAI


IDS = re.compile(r'"(prompt_)?token_ids"\s*:\s*\[')  # an id list, not null


def raw_stream(base_url: str, path: str, body: dict) -> dict:
    """One streaming request's raw SSE lines, checked for token id lists the client should not see."""
    try:
        url = urlparse(base_url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        conn.request("POST", url.path.rstrip("/") + path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        return {"status": None, "exception": f"{type(e).__name__}: {e}", "done": False, "events": 0,
                "id_lists_seen": None}
    lines = [x for x in raw.splitlines() if x.startswith("data: ")]
    pairs = [(x, json.loads(x[6:])) for x in lines if x != "data: [DONE]"]
    line, content = next(((x, e) for x, e in pairs if e.get("choices") and (
        e["choices"][0].get("text") or (e["choices"][0].get("delta") or {}).get("content"))), ("", {}))
    return {"status": response.status, "events": len(pairs), "done": bool(lines) and lines[-1] == "data: [DONE]",
            "id_lists_seen": sum(bool(IDS.search(x)) for x in lines),
            "token_ids_keys": sum('"token_ids"' in x for x in lines),
            "chunk_keys": sorted(content), "choice_keys": sorted((content.get("choices") or [{}])[0]),
            "first_content_line": line[:400], "body_head": "" if lines else raw[:400]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key="none", timeout=120)
    summary: dict = {"models": [m.id for m in client.models.list().data]}

    started = time.perf_counter()
    first = None
    chunks, text, usage, finish = 0, [], None, None
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "Say hello in one short sentence."}],
        max_tokens=32,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                text.append(choice.delta.content)
            finish = choice.finish_reason or finish
    summary["stream"] = {
        "chunks": chunks,
        "text": "".join(text),
        "usage": usage,
        "finish_reason": finish,
        "ttft_ms": round(((first or started) - started) * 1000, 1),
        "total_ms": round((time.perf_counter() - started) * 1000, 1),
    }
    done = client.completions.create(model=args.model, prompt="def main():", max_tokens=16, temperature=0.0)
    summary["completion"] = {"text": done.choices[0].text, "usage": done.usage.model_dump()}

    summary["raw_chat"] = raw_stream(args.base_url, "/chat/completions", {
        "model": args.model, "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 24,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    summary["raw_completion"] = raw_stream(args.base_url, "/completions", {
        "model": args.model, "prompt": "The capital of France is", "max_tokens": 24, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}})
    raw_ok = all(r["status"] == 200 and r["done"] and r["events"] >= 3 and r["id_lists_seen"] == 0
                 for r in (summary["raw_chat"], summary["raw_completion"]))
    summary["no_token_ids_seen"] = raw_ok

    ok = (
        raw_ok
        and args.model in summary["models"]
        and chunks >= 3
        and usage is not None
        and usage["completion_tokens"] > 0
        and finish in ("length", "stop")
        and done.usage.completion_tokens > 0
    )
    summary["ok"] = ok
    print(json.dumps(summary, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
