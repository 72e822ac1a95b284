"""Render the Grafana dashboard as a PNG from a short live run: no Prometheus or Grafana needed.

Drives a short mixed load (streaming chat, completions, embeddings, a few deliberate 400s) at a few
concurrency levels against a running app, scrapes its `/metrics` every few seconds, evaluates every
panel's PromQL from `observability/grafana-dashboard.json` over those scrapes, and draws the panels
as a matplotlib grid (`docs/dashboard.png`).

    .venv/bin/python scripts/render_dashboard.py --url http://127.0.0.1:8000
    .venv/bin/python scripts/render_dashboard.py --serve serve_configs/cpu.yaml   # starts and stops an app

The panels' queries are evaluated by a small evaluator covering the PromQL subset the dashboard uses:
selectors with `=`, `!=`, `=~`, `!~` matchers, `rate(sel[window])`, `sum|max|min|avg|count [by (...)]`,
`histogram_quantile`, and `* / + -` between vectors with the same labels or with numbers. `rate` is the
counter delta over the last `--window` seconds of scrapes (series absent from the earlier scrape count
from 0), and `histogram_quantile` interpolates in buckets as Prometheus does. Needs matplotlib (the
`bench` extra); the evaluator itself does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import pathlib
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "observability" / "grafana-dashboard.json"

# --- a PromQL subset -------------------------------------------------------------------------------

TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<range>\[[^\]]+\])
      | (?P<number>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
      | (?P<op>=~|!~|!=|=|[-+*/(){},])
      | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    )""",
    re.VERBOSE,
)
AGGREGATIONS = {"sum", "max", "min", "avg", "count"}
DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
DURATION_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, pos, expr = [], 0, expr.strip()
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot parse PromQL at {expr[pos:pos + 30]!r} in {expr!r}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


def parse_duration(text: str) -> float:
    parts = DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"bad duration {text!r}")
    return sum(float(n) * DURATION_S[u] for n, u in parts)


@dataclass
class Selector:
    name: str
    matchers: list[tuple[str, str, str]]
    window: str | None = None

    def matches(self, labels: dict[str, str]) -> bool:
        for label, op, value in self.matchers:
            actual = labels.get(label, "")
            if op == "=" and actual != value or op == "!=" and actual == value:
                return False
            if op in ("=~", "!~") and (re.fullmatch(value, actual) is not None) != (op == "=~"):
                return False
        return True


class Parser:
    """Recursive descent over the subset; the tree is nested tuples and `Selector`s."""

    def __init__(self, expr: str):
        self.expr, self.tokens, self.i = expr, tokenize(expr), 0

    def parse(self):
        node = self.additive()
        if self.i != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.i][1]!r} in {self.expr!r}")
        return node

    def peek(self, value: str | None = None, kind: str | None = None) -> bool:
        if self.i >= len(self.tokens):
            return False
        k, v = self.tokens[self.i]
        return (value is None or v == value) and (kind is None or k == kind)

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        if not self.peek(value, kind):
            got = self.tokens[self.i][1] if self.i < len(self.tokens) else "end"
            raise ValueError(f"expected {value or kind!r}, got {got!r} in {self.expr!r}")
        self.i += 1
        return self.tokens[self.i - 1][1]

    def additive(self):
        node = self.multiplicative()
        while self.peek("+") or self.peek("-"):
            node = ("bin", self.take(), node, self.multiplicative())
        return node

    def multiplicative(self):
        node = self.primary()
        while self.peek("*") or self.peek("/"):
            node = ("bin", self.take(), node, self.primary())
        return node

    def labels(self) -> list[str]:
        self.take("(")
        names = []
        while not self.peek(")"):
            names.append(self.take(kind="ident"))
            if not self.peek(")"):
                self.take(",")
        self.take(")")
        return names

    def primary(self):
        if self.peek(kind="number"):
            return ("num", float(self.take()))
        if self.peek("("):
            self.take("(")
            node = self.additive()
            self.take(")")
            return node
        name = self.take(kind="ident")
        if name in AGGREGATIONS:
            by = self.labels() if self.peek("by") and self.take("by") else None
            self.take("(")
            inner = self.additive()
            self.take(")")
            if by is None and self.peek("by"):
                self.take("by")
                by = self.labels()
            return ("agg", name, by, inner)
        if name == "rate":
            self.take("(")
            sel = self.selector(self.take(kind="ident"))
            self.take(")")
            if sel.window is None:
                raise ValueError(f"rate() needs a range selector in {self.expr!r}")
            return ("rate", sel)
        if name == "histogram_quantile":
            self.take("(")
            quantile = float(self.take(kind="number"))
            self.take(",")
            inner = self.additive()
            self.take(")")
            return ("quantile", quantile, inner)
        if self.peek("("):
            raise ValueError(f"function {name}() is outside the supported subset in {self.expr!r}")
        return self.selector(name)

    def selector(self, name: str) -> Selector:
        matchers = []
        if self.peek("{"):
            self.take("{")
            while not self.peek("}"):
                label = self.take(kind="ident")
                op = self.take(kind="op")
                if op not in ("=", "!=", "=~", "!~"):
                    raise ValueError(f"bad matcher operator {op!r} in {self.expr!r}")
                value = json.loads(self.take(kind="string"))
                matchers.append((label, op, value))
                if not self.peek("}"):
                    self.take(",")
            self.take("}")
        window = self.take(kind="range")[1:-1].strip() if self.peek(kind="range") else None
        return Selector(name, matchers, window)


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's `$var` / `${var}` interpolation (longest names first, so `$model_x` is not `$model`)."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return expr


def parse(expr: str, variables: dict[str, str] | None = None):
    return Parser(substitute(expr, variables or {"__rate_interval": "1m", "model": ".*"})).parse()


def selectors(node) -> list[Selector]:
    """Every selector of a parsed expression (the metric names it reads)."""
    if isinstance(node, Selector):
        return [node]
    return [s for part in node[1:] if isinstance(part, (tuple, Selector)) for s in selectors(part)]


def metric_names(expr: str) -> set[str]:
    return {s.name for s in selectors(parse(expr))}


Labels = frozenset  # of (name, value) pairs
Vector = dict  # Labels -> float


@dataclass
class Scrape:
    t: float
    series: dict[str, dict[Labels, float]] = field(default_factory=lambda: defaultdict(dict))

    @classmethod
    def parse(cls, t: float, text: str) -> Scrape:
        from prometheus_client.parser import text_string_to_metric_families

        scrape = cls(t)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                scrape.series[s.name][frozenset(s.labels.items())] = s.value
        return scrape


def evaluate(node, scrapes: list[Scrape], i: int, window_s: float | None = None) -> Vector | float:
    """The value of `node` at scrape `i`; `window_s` overrides every range selector's window."""
    kind = "sel" if isinstance(node, Selector) else node[0]
    if kind == "num":
        return node[1]
    if kind == "sel":
        return {labels: v for labels, v in scrapes[i].series.get(node.name, {}).items() if node.matches(dict(labels))}
    if kind == "rate":
        sel = node[1]
        window = window_s if window_s is not None else parse_duration(sel.window)
        if i == 0:
            return {}
        j = next((k for k in range(i) if scrapes[k].t >= scrapes[i].t - window - 1e-9), i - 1)
        now, before = evaluate(sel, scrapes, i), evaluate(sel, scrapes, j)
        dt = scrapes[i].t - scrapes[j].t
        out = {}
        for labels, v in now.items():
            prev = before.get(labels, 0.0)
            out[labels] = (v - prev if v >= prev else v) / dt  # a drop is a counter reset
        return out
    if kind == "agg":
        _, op, by, inner = node
        vector = evaluate(inner, scrapes, i, window_s)
        groups: dict[Labels, list[float]] = defaultdict(list)
        for labels, v in vector.items():
            key = frozenset((k, val) for k, val in labels if by is not None and k in by)
            groups[key].append(v)
        fold = {"sum": sum, "max": max, "min": min, "avg": lambda xs: sum(xs) / len(xs), "count": len}[op]
        return {k: float(fold(vs)) for k, vs in groups.items()}
    if kind == "quantile":
        return histogram_quantile(node[1], evaluate(node[2], scrapes, i, window_s))
    if kind == "bin":
        _, op, lhs, rhs = node
        a, b = evaluate(lhs, scrapes, i, window_s), evaluate(rhs, scrapes, i, window_s)
        apply = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
                 "/": lambda x, y: x / y if y else math.nan}[op]
        if isinstance(a, float) and isinstance(b, float):
            return apply(a, b)
        if isinstance(b, float):
            return {k: apply(v, b) for k, v in a.items()}
        if isinstance(a, float):
            return {k: apply(a, v) for k, v in b.items()}
        return {k: apply(v, b[k]) for k, v in a.items() if k in b}
    raise ValueError(f"unknown node {node!r}")


def histogram_quantile(q: float, buckets: Vector) -> Vector:
    """Prometheus's interpolation: linear inside the bucket holding rank q * count."""
    series: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for labels, v in buckets.items():
        d = dict(labels)
        if "le" in d:
            le = d.pop("le")
            series[frozenset(d.items())].append((math.inf if le == "+Inf" else float(le), v))
    out = {}
    for labels, bs in series.items():
        bs.sort()
        if bs[-1][0] != math.inf or bs[-1][1] <= 0:
            out[labels] = math.nan
            continue
        rank = q * bs[-1][1]
        lower, below = 0.0, 0.0
        for upper, cumulative in bs:
            if cumulative >= rank:
                if upper == math.inf:
                    out[labels] = bs[-2][0] if len(bs) > 1 else math.nan
                elif cumulative == below:
                    out[labels] = upper
                else:
                    out[labels] = lower + (upper - lower) * (rank - below) / (cumulative - below)
                break
            lower, below = upper, cumulative
    return out


def legend(template: str, labels: Labels) -> str:
    values = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values.get(m.group(1), ""), template).strip()


def panel_series(panel: dict, scrapes: list[Scrape], window_s: float, model: str = ".*"):
    """{legend: [value at each scrape]} for every target of a panel, as Grafana would draw them."""
    out: dict[str, list[float]] = {}
    for target in panel["targets"]:
        node = parse(target["expr"], {"__rate_interval": f"{window_s}s", "model": model})
        values = [evaluate(node, scrapes, i, window_s) for i in range(len(scrapes))]
        keys = sorted({k for v in values if isinstance(v, dict) for k in v}, key=sorted)
        for key in keys:
            name = legend(target.get("legendFormat", ""), key) or target["refId"]
            out[name] = [v.get(key, math.nan) if isinstance(v, dict) else v for v in values]
    return out


# --- load and scraping -----------------------------------------------------------------------------

CHAT, EMBED = "tiny-chat", "all-MiniLM-L6-v2"
REQUESTS = [  # (weight, route, body)
    (4, "/v1/chat/completions", {"model": CHAT, "messages": [{"role": "user", "content": "Tell me a story."}],
                                 "max_tokens": 32, "ignore_eos": True, "stream": True,
                                 "stream_options": {"include_usage": True}}),
    (3, "/v1/completions", {"model": CHAT, "prompt": "The weather today is", "max_tokens": 16}),
    (3, "/v1/embeddings", {"model": EMBED, "input": ["one sentence", "and another one"]}),
    (0.3, "/v1/chat/completions", {"model": CHAT, "messages": "not a list"}),  # a 400, for the error panel
]


async def one_request(client, route: str, body: dict) -> int:
    if body.get("stream"):
        async with client.stream("POST", route, json=body) as r:
            async for _ in r.aiter_bytes():
                pass
            return r.status_code
    return (await client.post(route, json=body)).status_code


async def worker(client, stop: asyncio.Event, tally: dict) -> None:
    weights = [w for w, _, _ in REQUESTS]
    while not stop.is_set():
        _, route, body = random.choices(REQUESTS, weights)[0]
        try:
            status = await one_request(client, route, body)
            tally[f"{status // 100}xx"] = tally.get(f"{status // 100}xx", 0) + 1
        except Exception as e:  # noqa: BLE001 - counted, the run goes on
            tally[type(e).__name__] = tally.get(type(e).__name__, 0) + 1


async def scraper(client, every_s: float, t0: float, out: list[tuple[float, str]], stop: asyncio.Event) -> None:
    while True:
        r = await client.get("/metrics")
        r.raise_for_status()
        out.append((round(time.monotonic() - t0, 3), r.text))
        try:
            await asyncio.wait_for(stop.wait(), every_s)
            return
        except asyncio.TimeoutError:
            pass


async def drive(url: str, api_key: str | None, levels: list[int], stage_s: float, idle_s: float,
                scrape_s: float) -> dict:
    """The run: raw scrapes `[(seconds, exposition)]`, `stages` `[(start, end, concurrency)]`, `tally`."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        t0, scrapes, stages, tally = time.monotonic(), [], [], {}
        done = asyncio.Event()
        scraping = asyncio.create_task(scraper(client, scrape_s, t0, scrapes, done))
        await asyncio.sleep(idle_s)
        for level in levels:
            stop = asyncio.Event()
            start = time.monotonic() - t0
            workers = [asyncio.create_task(worker(client, stop, tally)) for _ in range(level)]
            await asyncio.sleep(stage_s)
            stop.set()
            await asyncio.gather(*workers)
            stages.append((start, time.monotonic() - t0, level))
            print(f"after concurrency {level}: {tally} (so far)", flush=True)
        await asyncio.sleep(idle_s)
        done.set()
        await scraping
    return {"scrapes": scrapes, "stages": stages, "tally": tally}


# --- drawing ---------------------------------------------------------------------------------------

UNIT_LABEL = {"reqps": "requests / s", "s": "seconds", "short": "", "percentunit": "fraction (1 = 100 %)"}


def render(dashboard: dict, scrapes: list[Scrape], stages, window_s: float, out: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    cols = max(1, 24 // max(p["gridPos"]["w"] for p in panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 5.6 * rows), squeeze=False)
    times = [s.t for s in scrapes]
    for ax, panel in zip(axes.flat, panels):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        series = panel_series(panel, scrapes, window_s)
        colors: dict[str, str] = {}
        for name, values in series.items():  # a series' p50 and p99 share a colour; p99 is dashed
            base = re.sub(r"\bp\d+\b", "", name)
            color = colors.setdefault(base, f"C{len(colors) % 10}")
            ax.plot(times, values, "--" if re.search(r"\bp99\b", name) else "-", color=color, linewidth=1.6,
                    label=name)
        for start, end, level in stages:
            ax.axvspan(start, end, color="0.5", alpha=0.06 + 0.04 * stages.index((start, end, level)))
            ax.text((start + end) / 2, 1.0, f"c={level}", transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8, color="0.35")
        ax.set_title(panel["title"], fontsize=11, fontweight="bold", pad=14)
        ax.set_xlabel("seconds", fontsize=8)
        ax.set_ylabel(UNIT_LABEL.get(unit, unit), fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        finite = [v for vs in series.values() for v in vs if v == v]
        if unit == "percentunit":
            from matplotlib.ticker import PercentFormatter

            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.set_ylim(0, max(1.2 * max(finite, default=0), 0.001))
        elif unit == "s" and any(v > 0 for v in finite):
            ax.set_yscale("log")  # latencies span milliseconds (gaps) to seconds (whole answers)
        else:
            ax.set_ylim(bottom=0)
        if finite:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        else:
            ax.text(0.5, 0.5, "no data in this run", transform=ax.transAxes, ha="center", va="center", color="0.5")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="a running app (ignored with --serve)")
    ap.add_argument("--serve", type=pathlib.Path, help="start this serve config on a free port, stop it after")
    ap.add_argument("--api-key", help="a key from the app's api_keys, when it has any")
    ap.add_argument("--dashboard", type=pathlib.Path, default=DASHBOARD)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "dashboard.png")
    ap.add_argument("--concurrency", default="1,4,8", help="comma-separated levels, one stage each")
    ap.add_argument("--stage-seconds", type=float, default=15)
    ap.add_argument("--idle-seconds", type=float, default=5, help="quiet time before and after the load")
    ap.add_argument("--scrape-seconds", type=float, default=2)
    ap.add_argument("--window", type=float, default=10, help="seconds each rate/quantile covers ($__rate_interval)")
    ap.add_argument("--save-run", type=pathlib.Path, help="also keep the raw scrapes here (JSON), for --replay")
    ap.add_argument("--replay", type=pathlib.Path, help="render a run saved with --save-run; sends no load")
    args = ap.parse_args()

    dashboard = json.loads(args.dashboard.read_text())
    if args.replay:
        run = json.loads(args.replay.read_text())
    else:
        run = load_run(args)
        if args.save_run:
            args.save_run.write_text(json.dumps(run))
    scrapes = [Scrape.parse(t, text) for t, text in run["scrapes"]]
    stages = [tuple(stage) for stage in run["stages"]]
    levels = ",".join(str(level) for _, _, level in stages)
    requests = sum(v for k, v in run["tally"].items() if k.endswith("xx"))
    title = (f"{dashboard['title']}: {len(scrapes)} scrapes of /metrics, concurrency {levels}, "
             f"{requests} requests, {args.window:g}s rate window")
    render(dashboard, scrapes, stages, args.window, args.out, title)
    print(f"wrote {args.out} ({run['tally']})")
    return 0


def load_run(args) -> dict:
    levels = [int(c) for c in args.concurrency.split(",")]
    app = None
    if args.serve:
        import tempfile

        from launch import serve_run  # scripts/launch.py, beside this script

        app = serve_run(args.serve.resolve(), pathlib.Path(tempfile.mkdtemp(prefix="render-dashboard-")))
        print(f"starting {args.serve} on {app.url} (log {app.log_path})", flush=True)
        app.wait_ready()
    try:
        return asyncio.run(drive(app.url if app else args.url, args.api_key, levels, args.stage_seconds,
                                 args.idle_seconds, args.scrape_seconds))
    finally:
        if app:
            app.stop()


if __name__ == "__main__":
    sys.exit(main())
