"""Checks a running OpenAI-compatible server end to end with the `openai` client: models, a streaming
chat completion (counts chunks and checks the usage block), a non-streaming completion.

Usage: python scripts/device/chat_check.py --base-url http://127.0.0.1:8000/v1 --model NAME
Prints a JSON summary (and the streamed text); exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from openai import OpenAI


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

    ok = (
        args.model in summary["models"]
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
