"""The Grafana dashboard (`observability/grafana-dashboard.json`) against the series the app really exports."""

from __future__ import annotations

import json
import math
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import IngressMetrics, merged_exposition

from conftest import ROOT, import_script

DASHBOARD_PATH = ROOT / "observability" / "grafana-dashboard.json"
CHAT = "tiny-chat"
EMBED = "all-MiniLM-L6-v2"
HELLO = [{"role": "user", "content": "Say hello."}]
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}


render = import_script("render_dashboard")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text())


def targets(dashboard: dict) -> list[tuple[str, dict]]:
    return [(panel["title"], t) for panel in dashboard["panels"] for t in panel["targets"]]


def referenced_metrics(dashboard: dict) -> set[str]:
    return {name for _, t in targets(dashboard) for name in render.metric_names(t["expr"])}


# --- fast: the file itself ------------------------------------------------------------------------


def test_dashboard_is_importable_json_with_variables(dashboard):
    assert dashboard["schemaVersion"] >= 36 and dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["includeAll"] and model["allValue"] == ".*"
    assert model["query"]["query"] == "label_values(llm_ingress_requests_total, model)"
    assert model["datasource"]["uid"] == "${datasource}"


def test_every_panel_has_a_prometheus_datasource_and_queries(dashboard):
    panels = dashboard["panels"]
    assert len(panels) >= 9
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_panels_cover_the_issue(dashboard):
    exprs = " ".join(t["expr"] for _, t in targets(dashboard))
    for needed in [
        "llm_ingress_requests_total", 'status=~"5.."', 'status=~"4.."',
        "histogram_quantile(0.5, sum by (le, model) (rate(llm_ingress_time_to_first_byte_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, model) (rate(llm_ingress_time_to_first_byte_seconds_bucket",
        "llm_ingress_inter_token_latency_seconds_bucket", "llm_ingress_request_duration_seconds_bucket",
        'rate(llm_ingress_tokens_total{model=~"$model", kind="completion"}', "vllm:generation_tokens_total",
        "llm_ingress_requests_in_flight", "vllm:num_requests_running", "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc", "llm_ingress_spillover_requests_total",
    ]:
        assert needed in exprs, needed


def test_every_query_parses_and_filters_by_the_model_variable(dashboard):
    for title, target in targets(dashboard):
        tree = render.parse(target["expr"])  # raises on anything outside the renderer's PromQL subset
        for sel in render.selectors(tree):
            label = "model_name" if sel.name.startswith("vllm:") else "model"
            assert (label, "=~", ".*") in sel.matchers, (title, target["expr"])
        assert set(re.findall(r"\[([^\]]*)\]", target["expr"])) <= {"$__rate_interval"}, target["expr"]


def synthetic_exposition(chat: int, streamed_chunks: int) -> str:
    """An exposition shaped like the app's, with `chat` requests counted and one vLLM replica."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    ingress = IngressMetrics()
    for i in range(chat):
        ingress.requests.labels(ROUTES["chat"], CHAT, "200").inc()
        ingress.first_byte.labels(ROUTES["chat"], CHAT).observe(0.02 * (i + 1))
        ingress.duration.labels(ROUTES["chat"], CHAT).observe(0.2 * (i + 1))
        ingress.tokens.labels(CHAT, "completion").inc(10)
    for _ in range(streamed_chunks):
        ingress.inter_chunk.labels(ROUTES["chat"], CHAT).observe(0.004)
    ingress.requests.labels(ROUTES["chat"], CHAT, "400").inc(chat // 2)
    ingress.requests.labels(ROUTES["chat"], CHAT, "503").inc(0)
    ingress.spillover.labels(CHAT, EMBED).inc(0)
    ingress.in_flight.labels(CHAT).set(2)
    engine = CollectorRegistry()
    labels = ["engine", "model_name"]
    Counter("vllm:generation_tokens", "", labels, registry=engine).labels("0", CHAT).inc(10 * chat)
    Gauge("vllm:num_requests_running", "", labels, registry=engine).labels("0", CHAT).set(1)
    Gauge("vllm:num_requests_waiting", "", labels, registry=engine).labels("0", CHAT).set(3)
    Gauge("vllm:kv_cache_usage_perc", "", labels, registry=engine).labels("0", CHAT).set(0.25)
    ttft = Histogram("vllm:time_to_first_token_seconds", "", labels, buckets=(0.01, 0.1, 1), registry=engine)
    for _ in range(chat):
        ttft.labels("0", CHAT).observe(0.05)
    return merged_exposition(ingress.exposition(), {CHAT: generate_latest(engine).decode()})


def test_renderer_evaluates_every_panel_on_app_shaped_scrapes(dashboard):
    scrapes = [render.Scrape.parse(0.0, synthetic_exposition(0, 0)),
               render.Scrape.parse(10.0, synthetic_exposition(10, 40))]
    by_title = {p["title"]: render.panel_series(p, scrapes, window_s=10) for p in dashboard["panels"]}
    at_end = {title: {name: values[-1] for name, values in s.items()} for title, s in by_title.items()}

    requests = at_end["Request rate by model / status"]
    assert requests[f"{CHAT} 200"] == pytest.approx(1.0) and requests[f"{CHAT} 400"] == pytest.approx(0.5)
    assert at_end["Errors (4xx / 5xx)"][f"{CHAT} 400"] == pytest.approx(0.5)
    ttft = at_end["Time to first token (p50 / p99)"]
    assert 0.05 < ttft[f"{CHAT} p50"] < ttft[f"{CHAT} p99"] <= 0.25
    assert 0.01 <= ttft[f"{CHAT} p99 (vLLM engine)"] <= 0.1
    assert 0.0025 < at_end["Inter-token latency (p50 / p99)"][f"{CHAT} p50"] <= 0.005
    assert at_end["Request latency (p50 / p99)"][f"{CHAT} {ROUTES['chat']} p99"] <= 2.5
    tokens = at_end["Output tokens / s"]
    assert tokens[f"{CHAT} (ingress)"] == pytest.approx(10.0) == tokens[f"{CHAT} (vLLM)"]
    queue = at_end["In flight / vLLM queue"]
    assert (queue[f"{CHAT} in flight (ingress)"], queue[f"{CHAT} running (vLLM)"], queue[f"{CHAT} waiting (vLLM)"]) == (
        2, 1, 3)
    assert at_end["KV cache usage"] == {CHAT: 0.25}
    assert at_end["Spillover rate"] == {f"{CHAT} -> {EMBED}": 0.0}
    assert all(math.isnan(v) for v in by_title["Request rate by model / status"][f"{CHAT} 200"][:1])


def test_histogram_quantile_matches_prometheus_interpolation():
    le = lambda b: frozenset({("le", b)})  # noqa: E731
    buckets = {le("0.1"): 10.0, le("0.5"): 30.0, le("1.0"): 40.0, le("+Inf"): 40.0}
    q = lambda x: render.histogram_quantile(x, buckets)[frozenset()]  # noqa: E731
    assert q(0.25) == pytest.approx(0.1)
    assert q(0.5) == pytest.approx(0.3)  # rank 20: halfway through (0.1, 0.5]
    assert q(0.99) == pytest.approx(0.5 + 0.5 * 9.6 / 10)
    assert render.histogram_quantile(0.99, {le("1.0"): 1.0, le("+Inf"): 3.0})[frozenset()] == 1.0
    assert math.isnan(render.histogram_quantile(0.5, {le("1.0"): 0.0, le("+Inf"): 0.0})[frozenset()])


# --- integration: the live app ---------------------------------------------------------------------


def scrape(base_url: str) -> tuple[dict, dict]:
    """(families by name, sample values by (sample name, labels)) of the app's `/metrics`."""
    r = httpx.get(f"{base_url}/metrics", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    values = {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}
    return families, values


def total(values: dict, name: str, **labels) -> float:
    """The sum of `name` samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and want <= ls)


def exported(families: dict, name: str) -> bool:
    """Whether a name a query reads is in the scrape (the parser names counters and histograms by base)."""
    candidates = [(name, None)]
    for suffix, kinds in [("_bucket", ("histogram",)), ("_sum", ("histogram", "summary")),
                          ("_count", ("histogram", "summary")), ("_total", ("counter",))]:
        if name.endswith(suffix):
            candidates.append((name.removesuffix(suffix), kinds))
    return any(base in families and (kinds is None or families[base].type in kinds) for base, kinds in candidates)


@pytest.mark.integration
def test_dashboard_series_are_exported_with_right_values(base_url, client, dashboard):
    _, before = scrape(base_url)

    chat = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=8, extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(
        model=CHAT, messages=HELLO, max_tokens=12, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    stream_usage = next(c.usage for c in reversed(chunks) if c.usage)
    completion = client.completions.create(model=CHAT, prompt="one two three", max_tokens=6,
                                           extra_body={"ignore_eos": True})
    embedding = client.embeddings.create(model=EMBED, input=["a sentence to embed"])
    sent_completion_tokens = chat.usage.completion_tokens + stream_usage.completion_tokens \
        + completion.usage.completion_tokens
    assert sent_completion_tokens == 8 + 12 + 6

    expected = {
        (ROUTES["chat"], CHAT): 2, (ROUTES["completions"], CHAT): 1, (ROUTES["embeddings"], EMBED): 1,
    }
    deadline = time.monotonic() + 30
    while True:  # a stream is counted when its relay ends, a moment after the client's last byte
        families, after = scrape(base_url)

        def delta(name, **labels):
            return total(after, name, **labels) - total(before, name, **labels)

        counted = {key: delta("llm_ingress_requests_total", route=key[0], model=key[1], status="200")
                   for key in expected}
        settled = counted == expected and delta("vllm:generation_tokens_total", model_name=CHAT) \
            >= sent_completion_tokens
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counted == expected, counted
    assert delta("vllm:generation_tokens_total", model_name=CHAT) >= sent_completion_tokens

    # Every metric the dashboard reads is in the exposition.
    missing = sorted(name for name in referenced_metrics(dashboard) if not exported(families, name))
    assert not missing, f"the dashboard reads series /metrics lacks: {missing}"
    assert families["llm_ingress_requests"].type == "counter"
    assert families["llm_ingress_time_to_first_byte_seconds"].type == "histogram"
    assert families["vllm:kv_cache_usage_perc"].type == "gauge"

    # Counts match what was sent, with the right route/model/status labels.
    assert counted == expected
    for s in families["llm_ingress_requests"].samples:
        assert set(s.labels) == {"route", "model", "status"} and s.labels["status"].isdigit(), s
    assert delta("llm_ingress_requests_total", route=ROUTES["embeddings"], model=CHAT) == 0

    # Histograms: one observation per request (TTFB, duration), gaps between the chunks of a stream.
    for route, model in expected:
        n = expected[(route, model)]
        for hist in ("llm_ingress_time_to_first_byte_seconds", "llm_ingress_request_duration_seconds"):
            assert delta(f"{hist}_count", route=route, model=model) == n, (hist, route)
            assert delta(f"{hist}_sum", route=route, model=model) > 0
            assert delta(f"{hist}_bucket", route=route, model=model, le="+Inf") == n
    gaps = delta("llm_ingress_inter_token_latency_seconds_count", route=ROUTES["chat"], model=CHAT)
    # The stream's first chunk goes at once, the rest follow (coalesced over the 50 ms window); the
    # non-streamed answer is one chunk: no gap.
    assert gaps >= 1
    assert delta("llm_ingress_inter_token_latency_seconds_sum", route=ROUTES["chat"], model=CHAT) > 0

    # Tokens: the ingress counts the usage of each answer; vLLM counts what it generated.
    assert delta("llm_ingress_tokens_total", model=CHAT, kind="completion") == sent_completion_tokens
    prompt_tokens = chat.usage.prompt_tokens + stream_usage.prompt_tokens + completion.usage.prompt_tokens
    assert delta("llm_ingress_tokens_total", model=CHAT, kind="prompt") == prompt_tokens
    assert delta("llm_ingress_tokens_total", model=EMBED, kind="prompt") == embedding.usage.prompt_tokens > 0
    assert delta("vllm:generation_tokens_total", model_name=CHAT) >= sent_completion_tokens
    assert delta("vllm:time_to_first_token_seconds_count", model_name=CHAT) >= 3

    # Gauges: nothing open any more; the engines' gauges carry model_name and replica.
    for model in (CHAT, EMBED):
        assert total(after, "llm_ingress_requests_in_flight", model=model) == 0
        for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            assert total(after, gauge, model_name=model) == 0
        kv = [s for s in families["vllm:kv_cache_usage_perc"].samples if s.labels["model_name"] == model]
        assert kv and all(0 <= s.value <= 1 and s.labels["replica"] for s in kv)
    assert families["llm_ingress_spillover_requests"].type == "counter"
