"""Soak: the embedded default under mixed OpenAI load for a long time, one engine replica SIGKILLed every few minutes.

Starts its own app (`serve run serve_configs/cpu.yaml`, as the tests do), runs chat, streaming chat, completions,
embeddings and deliberate 400s from `--concurrency` clients, kills the replica actor of one model at a time
(alternating), samples the resident memory of every process of the app, stops the app and counts the engine and
HAProxy processes left behind. Not part of CI:
    .venv/bin/python scripts/soak.py --minutes 30 --kill-every-min 5 --name soak-cpu
writes benchmarks/<name>.json, .md and .png. Exits non-zero when a request failed outside the recovery window
after a kill, or a process was left behind.

`--migration`: two replicas of the tiny chat model (tests/configs/migration.yaml) under `--concurrency` greedy
streams, one replica SIGKILLed whenever both run and `--kill-every-min` passed; in-flight streams move to the other
replica (`app.migration`), so every failure counts (no recovery window) and so does a stream short of its tokens:
    .venv/bin/python scripts/soak.py --migration --minutes 30 --kill-every-min 2 --concurrency 16 \
        --name soak-migration-30min
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import pathlib
import random
import re
import signal
import statistics
import sys
import tempfile
import time

import httpx
import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from launch import ROOT, leftover_processes, running, serve_run  # noqa: E402

CHAT, EMBED = "tiny-chat", "all-MiniLM-L6-v2"
REQUESTS = [  # (kind, model, route, body)
    ("chat", CHAT, "/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 64}),
    ("stream", CHAT, "/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": "go"}],
                                              "max_tokens": 64, "stream": True}),
    ("completions", CHAT, "/v1/completions", {"model": CHAT, "prompt": ["a", "b"], "max_tokens": 32, "n": 2}),
    ("embeddings", EMBED, "/v1/embeddings", {"model": EMBED, "input": ["one sentence", "and another"]}),
    ("bad", CHAT, "/v1/chat/completions", {"model": CHAT, "messages": "garbage"}),  # a 400 on purpose
]
MIGRATION_TOKENS = 256
MIGRATION_REQUESTS = [("stream", CHAT, "/v1/chat/completions", {
    "model": CHAT, "messages": [{"role": "user", "content": "go on"}], "max_tokens": MIGRATION_TOKENS,
    "ignore_eos": True, "temperature": 0, "logprobs": True, "stream": True, "stream_options": {"include_usage": True}})]
METHOD_SUFFIX = re.compile(r"\.[a-z_]+$")
PLOT_MIN_MIB = 150  # processes below this get one summed line in the plot (all are in the table)
RECOVERY_WINDOW_S = 180  # failures this soon after a kill of the same model are the kill's, not a fault


async def one_request(client: httpx.AsyncClient, route: str, body: dict, served: dict) -> tuple[str, str | None]:
    """(outcome, detail): the HTTP status, 'stream-error' for a stream that ended without [DONE] or carried an
    error event, or 'error:<type>'; the detail says what went wrong. `served["replica"]`: the replica that took it."""
    try:
        if not body.get("stream"):
            r = await client.post(route, json=body)
            return str(r.status_code), None if r.status_code < 500 else r.text[:300]
        async with client.stream("POST", route, json=body) as r:
            served["replica"] = r.headers.get("x-served-by-replica")
            lines = [line async for line in r.aiter_lines() if line]
        if r.status_code == 200 and (not lines or lines[-1] != "data: [DONE]" or
                                     any(x.startswith('data: {"error"') for x in lines)):
            return "stream-error", f"{len(lines)} lines, last: {lines[-1][:300] if lines else None}"
        if r.status_code == 200 and body.get("ignore_eos") and body.get("logprobs"):
            tokens, usage = tokens_and_usage(lines)
            if tokens != body["max_tokens"] or usage != body["max_tokens"]:
                return "stream-short", f"{tokens} tokens, usage {usage}, of {body['max_tokens']}"
        return str(r.status_code), None
    except httpx.HTTPError as e:
        return f"error:{type(e).__name__}", str(e)[:300]


def tokens_and_usage(lines: list[str]) -> tuple[int, int | None]:
    """(tokens in a chat stream's logprobs, its usage's completion_tokens)."""
    tokens, usage = 0, None
    for line in lines[:-1]:
        event = json.loads(line[6:])
        for choice in event.get("choices") or []:
            tokens += len((choice.get("logprobs") or {}).get("content") or [])
        usage = (event.get("usage") or {}).get("completion_tokens", usage)
    return tokens, usage


async def load(client: httpx.AsyncClient, deadline: float, started: float, log: list, requests: list) -> None:
    while time.monotonic() < deadline:
        kind, model, route, body = random.choice(requests)
        t0 = time.monotonic()
        served: dict = {}
        outcome, detail = await one_request(client, route, body, served)
        log.append({"t": round(t0 - started, 2), "kind": kind, "model": model, "outcome": outcome,
                    "latency_s": round(time.monotonic() - t0, 4), **({"detail": detail} if detail else {}), **served})


def process_label(proc: psutil.Process) -> str:
    """A stable name for an app process: a replica, an engine process, HAProxy, or a Ray daemon."""
    cmdline = proc.cmdline()
    title = cmdline[0] if cmdline else proc.name()
    if title.startswith(("ray::", "VLLM::")):
        return METHOD_SUFFIX.sub("", title.split(" ")[0])  # a replica's title names the method it runs
    if proc.name().startswith("VLLM::"):
        return proc.name()
    name = pathlib.Path(title).name
    if name.startswith("python"):
        script = next((pathlib.Path(a).name for a in cmdline[1:] if a.endswith(".py")), None)
        return script or ("resource_tracker" if "resource_tracker" in " ".join(cmdline) else "python")
    return name


def rss_by_label(root: psutil.Process, seen: set[int]) -> dict[str, float]:
    """MiB resident per process label, over the app's whole process tree (summed where a label repeats);
    adds the tree's pids to `seen`."""
    out: dict[str, float] = collections.defaultdict(float)
    for proc in [root, *root.children(recursive=True)]:
        seen.add(proc.pid)
        try:
            label = process_label(proc)
            if label.startswith("VLLM::"):  # which model's engine: the replica above it
                owner = next((process_label(p) for p in proc.parents()[:3] if "ServeReplica" in process_label(p)), "")
                label += f" ({owner.rsplit(':', 1)[-1]})"
            out[label] += proc.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return {k: round(v, 1) for k, v in out.items()}


def replica_pids(root: psutil.Process, model: str) -> list[int]:
    pids = []
    for proc in root.children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith(f"ray::ServeReplica:llm:{model}"):
                pids.append(proc.pid)
        except psutil.Error:
            pass
    return pids


def replica_pid(root: psutil.Process, model: str) -> int | None:
    pids = replica_pids(root, model)
    return pids[0] if pids else None


def serving_victim(url: str, log_path: pathlib.Path, model: str) -> tuple[int, str] | None:
    """(pid, replica id) of one of `model`'s replicas, once the routers list two (a migration soak keeps one to move
    to; a replica still starting is not listed): the pid from the replica's own lines in `serve run`'s output."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    pattern = rf'^vllm:num_requests_running{{[^}}]*model_name="{model}"[^}}]*replica="([^"]+)"'
    listed = set(re.findall(pattern, text, re.M))
    if len(listed) < 2:
        return None
    replica = random.choice(sorted(listed))
    found = re.search(rf"\(ServeReplica:llm:{model} pid=(\d+)\).* llm_{model} {replica} -- ",
                      log_path.read_text(errors="replace"))
    return (int(found[1]), replica) if found else None


def migrations(url: str) -> float:
    """Requests moved to another replica, as the routers count them (`llm_ingress_migrations`)."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    return sum(float(v) for v in re.findall(r"^llm_ingress_migrations_total{[^}]*} (\S+)$", text, re.M))


async def soak(url: str, root: psutil.Process, minutes: float, kill_every_s: float, concurrency: int,
               sample_s: float, seen: set[int], log_path: pathlib.Path | None = None) -> dict:
    migration = log_path is not None
    started = time.monotonic()
    deadline = started + minutes * 60
    log: list[dict] = []
    rss: list[dict] = []
    kills: list[dict] = []
    victims = [CHAT] if migration else [CHAT, EMBED]
    requests = MIGRATION_REQUESTS if migration else REQUESTS
    next_kill = started + kill_every_s
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        workers = [asyncio.create_task(load(client, deadline, started, log, requests)) for _ in range(concurrency)]
        while time.monotonic() < deadline:
            await asyncio.sleep(sample_s)
            now = time.monotonic()
            rss.append({"t": round(now - started, 1), "rss_mib": await asyncio.to_thread(rss_by_label, root, seen)})
            if now >= next_kill and now < deadline - 60:
                model = victims[len(kills) % len(victims)]
                victim = await asyncio.to_thread(serving_victim, url, log_path, model) if migration else \
                    (replica_pid(root, model), None)
                if victim is not None and victim[0] is not None:
                    os.kill(victim[0], signal.SIGKILL)
                    kills.append({"t": round(now - started, 1), "model": model, "pid": victim[0],
                                  **({"replica": victim[1]} if victim[1] else {})})
                    next_kill = max(next_kill + kill_every_s, now + (kill_every_s if migration else 0))
            done = collections.Counter(r["outcome"] for r in log)
            print(f"t={now - started:>6.0f}s kills={len(kills)} {dict(done)}", flush=True)
        await asyncio.gather(*workers)
    moved = await asyncio.to_thread(migrations, url)
    return {"requests": log, "rss": rss, "kills": kills, "migrations": moved, "migration": migration}


def recovery(log: list[dict], kills: list[dict]) -> list[dict]:
    """Per kill: the requests of that model that failed, and when it served again: the end of the longest pause
    between two of its successful answers that began around the kill (clients wait for a replica rather than fail)."""
    out = []
    for kill in kills:
        window = [r for r in log if r["model"] == kill["model"] and r["kind"] != "bad"
                  and kill["t"] - 60 <= r["t"] <= kill["t"] + RECOVERY_WINDOW_S]
        failed = [r for r in window if not r["outcome"].startswith("2")]
        done = sorted(r["t"] + r["latency_s"] for r in window if r["outcome"].startswith("2"))
        gaps = [(b - a, b) for a, b in zip(done, done[1:]) if a >= kill["t"] - 5]
        back = max(gaps)[1] if gaps else None
        out.append({**kill, "failed_requests": len(failed), "outcomes": dict(collections.Counter(
            r["outcome"] for r in failed)), "serving_again_after_s": round(back - kill["t"], 1) if back else None})
    return out


def unexpected_failures(log: list[dict], kills: list[dict], migration: bool = False) -> list[dict]:
    def explained(r):
        if r["outcome"] == ("400" if r["kind"] == "bad" else "200"):
            return True
        return not migration and any(
            k["model"] == r["model"] and k["t"] - 60 <= r["t"] <= k["t"] + RECOVERY_WINDOW_S for k in kills)
    return [r for r in log if not explained(r)]


def per_minute(log: list[dict]) -> list[dict]:
    buckets: dict[int, list[dict]] = collections.defaultdict(list)
    for r in log:
        buckets[int(r["t"] // 60)].append(r)
    rows = []
    for minute in sorted(buckets):
        ok = sorted(r["latency_s"] for r in buckets[minute] if r["outcome"].startswith("2"))
        rows.append({"minute": minute, "by_outcome": dict(collections.Counter(r["outcome"] for r in buckets[minute])),
                     "p50_ms": round(1000 * statistics.median(ok), 1) if ok else None,
                     "p99_ms": round(1000 * ok[min(len(ok) - 1, int(0.99 * len(ok)))], 1) if ok else None})
    return rows


def memory_trend(rss: list[dict], minutes: float) -> dict[str, dict]:
    """Per process label: median RSS over the first and the last fifth of the run (MiB) and the change."""
    span = max(1.0, minutes * 60 / 5)
    labels = sorted({k for s in rss for k in s["rss_mib"]})
    trend = {}
    for label in labels:
        first = [s["rss_mib"][label] for s in rss if label in s["rss_mib"] and s["t"] <= span]
        last = [s["rss_mib"][label] for s in rss if label in s["rss_mib"] and s["t"] >= minutes * 60 - span]
        if first and last:
            a, b = statistics.median(first), statistics.median(last)
            trend[label] = {"first_mib": round(a), "last_mib": round(b), "change_mib": round(b - a)}
    return trend


def markdown(report: dict) -> str:
    totals = collections.Counter(r["outcome"] for r in report["requests"])
    if report.get("migration"):
        return migration_markdown(report, totals)
    lines = [f"# Soak: {report['minutes']} min, embedded default (serve_configs/cpu.yaml), 2-core machine", "",
             f"{report['concurrency']} clients, mixed load (chat, streaming chat, completions n=2, embeddings, "
             f"deliberate 400s); one engine replica SIGKILLed every {report['kill_every_min']} min, alternating "
             f"models. Plot: `{report['name']}.png`; every request, RSS sample and kill: `{report['name']}.json`.", "",
             f"- requests: {sum(totals.values())}, by outcome: {dict(totals)}",
             f"- failures outside the {RECOVERY_WINDOW_S} s after a kill of the same model: "
             f"{len(report['unexpected_failures'])}",
             f"- processes left behind after the app stopped: {len(report['leaked_processes'])}", "",
             "| kill at s | model | failed requests | outcomes | serving again after s |", "|---|---|---|---|---|"]
    for k in report["recovery"]:
        lines.append(f"| {k['t']} | {k['model']} | {k['failed_requests']} | {k['outcomes']} | "
                     f"{k['serving_again_after_s']} |")
    lines += ["", "| process | RSS first fifth MiB | last fifth MiB | change |", "|---|---|---|---|"]
    for label, t in report["memory_trend"].items():
        lines.append(f"| {label} | {t['first_mib']} | {t['last_mib']} | {t['change_mib']:+d} |")
    return "\n".join(lines) + "\n"


def on_victims(report: dict) -> int:
    """Streams that a killed replica served when it was killed (each had to move)."""
    return sum(1 for k in report["kills"] for r in report["requests"]
               if r.get("replica") == k.get("replica") and r["t"] <= k["t"] <= r["t"] + r["latency_s"])


def migration_markdown(report: dict, totals: collections.Counter) -> str:
    lines = [f"# Migration soak: {report['minutes']} min, 2 tiny-chat replicas (tests/configs/migration.yaml), "
             "2-core machine", "",
             f"{report['concurrency']} live greedy streams ({MIGRATION_TOKENS} tokens, ignore_eos, logprobs); one "
             f"replica SIGKILLed whenever both ran and {report['kill_every_min']} min had passed. A stream counts "
             "as failed unless it ends with [DONE], has no error event, and carries every token (logprobs) and "
             f"usage. Plot: `{report['name']}.png`; every request, RSS sample and kill: `{report['name']}.json`.", "",
             f"- streams: {sum(totals.values())}, by outcome: {dict(totals)}",
             f"- client-visible failures: {len(report['unexpected_failures'])}",
             f"- kills: {len(report['kills'])}; streams in flight on the killed replicas: {on_victims(report)}; "
             f"requests moved to the other replica (llm_ingress_migrations): {report['migrations']:.0f}",
             f"- processes left behind after the app stopped: {len(report['leaked_processes'])}", "",
             "| process | RSS first fifth MiB | last fifth MiB | change |", "|---|---|---|---|"]
    for label, t in report["memory_trend"].items():
        lines.append(f"| {label} | {t['first_mib']} | {t['last_mib']} | {t['change_mib']:+d} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["per_minute"]
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(12, 12), sharex=True)
    outcomes = sorted({o for r in rows for o in r["by_outcome"]}, key=lambda o: (not o.startswith("2"), o))
    bottom = [0] * len(rows)
    for outcome in outcomes:
        counts = [r["by_outcome"].get(outcome, 0) for r in rows]
        a.bar([r["minute"] + 0.5 for r in rows], counts, bottom=bottom, width=0.9, label=outcome)
        bottom = [x + y for x, y in zip(bottom, counts)]
    a.set_ylabel("requests per minute")
    a.set_title("requests by outcome")
    a.legend(fontsize=8, ncol=4)
    b.plot([r["minute"] + 0.5 for r in rows], [r["p50_ms"] for r in rows], marker="o", label="p50")
    b.plot([r["minute"] + 0.5 for r in rows], [r["p99_ms"] for r in rows], marker="o", label="p99")
    b.set_ylabel("latency of successful requests, ms")
    b.set_yscale("log")
    b.legend()
    big = [k for k, t in report["memory_trend"].items() if max(t["first_mib"], t["last_mib"]) >= PLOT_MIN_MIB]
    minutes = [s["t"] / 60 for s in report["rss"]]
    for label in big:
        c.plot(minutes, [s["rss_mib"].get(label) for s in report["rss"]], label=label)
    c.plot(minutes, [sum(v for k, v in s["rss_mib"].items() if k not in big) for s in report["rss"]],
           label="all other processes (Ray daemons, dashboard, HAProxy, ...)")
    c.set_ylabel("RSS MiB")
    c.set_xlabel("minutes")
    c.set_title(f"RSS per app process; processes left after stop: {len(report['leaked_processes'])}")
    c.legend(fontsize=7, ncol=3)
    for ax in (a, b, c):
        for k in report["kills"]:
            ax.axvline(k["t"] / 60, color="red", linestyle="--", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--kill-every-min", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-s", type=float, default=10)
    parser.add_argument("--name", default="soak-cpu")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks"))
    parser.add_argument("--report", help="only re-render the report of this earlier run's JSON")
    parser.add_argument("--migration", action="store_true", help="2 chat replicas, streams that must survive kills")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(pathlib.Path(args.report).read_text())
        return write_report(saved["name"], args.out_dir, saved["minutes"], saved["kill_every_min"],
                            saved["concurrency"], saved, saved["leaked_processes"])
    seen: set[int] = set()  # every pid of the app's process tree, sampled
    config = ROOT / "tests" / "configs" / "migration.yaml" if args.migration else ROOT / "serve_configs" / "cpu.yaml"
    with tempfile.TemporaryDirectory() as workdir:
        with running(serve_run(config, pathlib.Path(workdir))) as app:
            root = psutil.Process(app.process.pid)
            result = asyncio.run(soak(app.url, root, args.minutes, args.kill_every_min * 60, args.concurrency,
                                      args.sample_s, seen, app.log_path if args.migration else None))
    deadline = time.monotonic() + 60
    while (left := leftover_processes() & seen) and time.monotonic() < deadline:
        time.sleep(1)
    return write_report(args.name, args.out_dir, args.minutes, args.kill_every_min, args.concurrency, result,
                        sorted(left))


def write_report(name: str, out_dir: str, minutes: float, kill_every_min: float, concurrency: int, result: dict,
                 leaked: list[int]) -> int:
    report = {"name": name, "minutes": minutes, "kill_every_min": kill_every_min, "concurrency": concurrency,
              "requests": result["requests"], "rss": result["rss"], "kills": result["kills"],
              "per_minute": per_minute(result["requests"]), "recovery": recovery(result["requests"], result["kills"]),
              "unexpected_failures": unexpected_failures(result["requests"], result["kills"], result.get("migration")),
              "migration": result.get("migration", False), "migrations": result.get("migrations"),
              "memory_trend": memory_trend(result["rss"], minutes), "leaked_processes": leaked}
    out = pathlib.Path(out_dir)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{name}.md").write_text(markdown(report))
    plot(report, out / f"{name}.png")
    print(markdown(report))
    return 1 if report["unexpected_failures"] or report["leaked_processes"] else 0


if __name__ == "__main__":
    sys.exit(main())
