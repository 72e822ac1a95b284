"""Migration on GPUs (issue 26, item 3, on one GPU): concurrent greedy streams through the app, one of the model's two
engine replicas SIGKILLed halfway; every client's text is compared with that of the same streams unkilled.

Steps, one JSON summary rewritten after each (--out DIR: migrate_summary.json, migrate_texts.json):
  wait      until the router lists --replicas replicas of the model (/metrics) and Ray shows their actors
  warmup    the streams, 16 tokens each
  ref_a     the streams unkilled (the reference), ref_b the same again (the control: how far greedy output on this
            GPU repeats at all when nothing is killed; batches differ from run to run)
  kill      the streams again; once the clients hold --kill-at of all tokens, SIGKILL the replica actor process
            (Serve's `ServeReplica`) serving the most streams; its engine processes die with it (app/process_guard.py)
  recovery  (if --recovery-s > 0) until Serve replaced the killed replica and the router lists it; then `post`, the
            streams unkilled once more, compared with ref_a

Stream i is a chat completion for even i and a completion for odd i (migration continues both differently), each
with its own prompt, temperature 0, ignore_eos, --max-tokens tokens, include_usage. A client-visible failure is a
stream that is not HTTP 200, does not end with `data: [DONE]`, carries an error event, raises, or has usage
completion_tokens != --max-tokens. Token id lists (`"token_ids":[..]`, the router's own) must not reach a client.
Migrations are read from the app's /metrics (llm_ingress_migrations_total) before and after the kill.

Plain stdlib client (threads, http.client): the device image has no httpx. The replica id -> process map comes from
Ray's GCS (actor names SERVE_REPLICA::<app>#<deployment>#<replica id>; the router's x-served-by-replica header is
that id); without Ray, any `ServeReplica:<app>:<deployment>` process is killed and the victim's id is unknown.

Usage: python scripts/device/migrate_streams.py --url http://127.0.0.1:8000 --model NAME --out DIR
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

IDS = re.compile(rb'"(prompt_)?token_ids"\s*:\s*\[')  # an id list reached the client (null is fine)
MIGRATIONS = re.compile(r"^llm_ingress_migrations(?:_total)?(?:\{[^}]*\})? (\S+)$", re.M)
RUNNING = re.compile(r"^vllm:num_requests_running\{([^}]*)\} (\S+)$", re.M)


class Stream:
    def __init__(self, index: int, route: str, body: dict):
        self.index, self.route, self.body = index, route, body
        self.status: int | None = None
        self.replica: str | None = None
        self.lines: list[bytes] = []
        self.end: str | None = None
        self.exception: str | None = None
        self.first_s = self.done_s = None

    def run(self, host: str, port: int, timeout: float, go: threading.Event, t0: list[float]) -> None:
        go.wait()
        try:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            conn.request("POST", self.route, json.dumps(self.body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            self.status, self.replica = response.status, response.getheader("x-served-by-replica")
            while True:
                line = response.readline()
                if not line:
                    self.end = "closed"
                    break
                if line.startswith(b"data: "):
                    if self.first_s is None:
                        self.first_s = time.monotonic() - t0[0]
                    self.lines.append(line.rstrip(b"\r\n"))
                    if line.startswith(b"data: [DONE]"):
                        self.end = "done"
                        break
            conn.close()
        except TimeoutError:
            self.end = "timeout"
        except (OSError, http.client.HTTPException) as e:
            self.end, self.exception = "error", f"{type(e).__name__}: {e}"
        self.done_s = time.monotonic() - t0[0]

    def answer(self) -> dict:
        """Text, usage, failures and leaks of this stream as the client got it."""
        text, usage, errors, ids, created, roles, bad = [], None, [], set(), set(), 0, 0
        for line in self.lines:
            if line == b"data: [DONE]":
                continue
            try:
                event = json.loads(line[6:])
            except ValueError:
                bad += 1
                continue
            if "error" in event:
                errors.append(json.dumps(event)[:300])
                continue
            ids.add(event.get("id"))
            created.add(event.get("created"))
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                roles += "role" in delta
                text.append(choice.get("text") or delta.get("content") or "")
        completion = (usage or {}).get("completion_tokens")
        return {"text": "".join(text), "status": self.status, "end": self.end, "exception": self.exception,
                "replica": self.replica, "errors": errors, "unparsed": bad, "usage": usage,
                "completion_tokens": completion, "distinct_ids": len(ids), "distinct_created": len(created),
                "role_chunks": roles, "id_lists_seen": sum(bool(IDS.search(x)) for x in self.lines),
                "events": len(self.lines), "first_s": self.first_s, "done_s": self.done_s}


def bodies(model: str, n: int, max_tokens: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}}
        if i % 2 == 0:
            out.append(("/v1/chat/completions", {**common, "messages": [
                {"role": "user", "content": f"Story {i}: tell me a long story about the number {i}."}]}))
        else:
            out.append(("/v1/completions", {**common, "prompt": f"Story {i}: once upon a time, the number {i} said"}))
    return out


class App:
    def __init__(self, url: str, model: str, deployment: str, app_name: str):
        parsed = urlparse(url)
        self.url, self.host, self.port = url.rstrip("/"), parsed.hostname, parsed.port or 80
        self.model, self.deployment, self.app_name = model, deployment, app_name
        self.ray = None

    def get(self, path: str, timeout: float = 30) -> str:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            return conn.getresponse().read().decode(errors="replace")
        finally:
            conn.close()

    def migrations(self) -> float | None:
        try:
            found = MIGRATIONS.findall(self.get("/metrics"))
        except (OSError, http.client.HTTPException):
            return None
        return sum(float(v) for v in found) if found else 0.0

    def router_replicas(self) -> dict[str, float]:
        """replica id -> running requests, as the router lists the model's replicas in /metrics."""
        try:
            text = self.get("/metrics")
        except (OSError, http.client.HTTPException):
            return {}
        found = {}
        for labels, value in RUNNING.findall(text):
            if f'model_name="{self.model}"' in labels:
                replica = re.search(r'replica="([^"]+)"', labels)
                found[replica.group(1) if replica else labels] = float(value)
        return found

    def replica_pids(self) -> dict[str, int]:
        """replica id -> pid of its live Serve replica actor (Ray's GCS); {} if Ray is not reachable."""
        if self.ray is False:
            return {}
        try:
            if self.ray is None:
                import ray

                ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
                self.ray = ray
            prefix = f"SERVE_REPLICA::{self.app_name}#{self.deployment}#"
            return {a["Name"][len(prefix):]: a["Pid"] for a in self.ray._private.state.actors().values()
                    if a["State"] == "ALIVE" and (a.get("Name") or "").startswith(prefix)}
        except Exception as e:  # noqa: BLE001 - fall back to the process table
            print(f"ray actors not readable: {type(e).__name__}: {e}", file=sys.stderr)
            self.ray = False
            return {}

    def replica_processes(self) -> list[int]:
        """Pids of the model's Serve replica processes, from their process titles."""
        title = f"ServeReplica:{self.app_name}:{self.deployment}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if title in Path(f"/proc/{entry}/cmdline").read_bytes():
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids


def children(pid: int) -> list[int]:
    """Every descendant of pid (the replica's vLLM engine core and worker)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rindex(")") + 2] != "Z"
    except (OSError, ValueError):
        return False


def run_streams(app: App, specs: list[tuple[str, dict]], timeout: float, wall: float,
                kill_at: float | None = None, max_tokens: int = 0) -> tuple[list[Stream], dict]:
    """All streams at once; with kill_at, SIGKILL the replica serving the most of them once the clients hold that
    fraction of all tokens. Returns the streams and what happened (kill details)."""
    go, t0 = threading.Event(), [0.0]
    streams = [Stream(i, route, body) for i, (route, body) in enumerate(specs)]
    threads = [threading.Thread(target=s.run, args=(app.host, app.port, timeout, go, t0), daemon=True)
               for s in streams]
    for t in threads:
        t.start()
    info: dict = {}
    pids = app.replica_pids() if kill_at is not None else {}
    info["replica_pids_before"] = pids
    t0[0] = time.monotonic()
    go.set()
    threshold = kill_at * len(streams) * max_tokens if kill_at is not None else None
    killed = False
    while any(t.is_alive() for t in threads) and time.monotonic() - t0[0] < wall:
        if threshold is not None and not killed:
            held = sum(len(s.lines) for s in streams)
            if held >= threshold:
                by_replica = Counter(s.replica for s in streams if s.replica)
                victim = by_replica.most_common(1)[0][0] if by_replica else None
                pid = pids.get(victim) if victim else None
                if pid is None:  # no id -> pid map: any replica process of the model
                    candidates = app.replica_processes()
                    pid, victim = (candidates[0], None) if candidates else (None, victim)
                if pid is None:
                    info["kill_error"] = "no replica process found"
                    killed = True
                    continue
                engine = children(pid)
                progress = {s.index: len(s.lines) for s in streams}
                os.kill(pid, signal.SIGKILL)
                killed = True
                info.update({"killed_pid": pid, "killed_replica": victim, "engine_pids": engine,
                             "killed_at_s": round(time.monotonic() - t0[0], 3), "killed_at_epoch": round(time.time(), 3),
                             "streams_by_replica": dict(by_replica), "events_held_at_kill": held,
                             "victim_streams": sorted(s.index for s in streams if victim and s.replica == victim),
                             "victim_progress_at_kill": sorted(progress[s.index] for s in streams
                                                               if victim and s.replica == victim)})
        time.sleep(0.002)
    info["wall_s"] = round(time.monotonic() - t0[0], 3)
    info["unfinished_threads"] = sum(t.is_alive() for t in threads)
    if killed and info.get("killed_pid"):
        time.sleep(max(0.0, 5 - (time.monotonic() - t0[0] - info["killed_at_s"])))
        info["engine_pids_alive_5s_after_kill"] = [p for p in info["engine_pids"] if alive(p)]
    if threshold is not None and not killed:
        info["kill_error"] = f"streams ended before {threshold:.0f} events were held"
    return streams, info


def summarize(streams: list[Stream], info: dict, max_tokens: int) -> tuple[dict, list[dict]]:
    answers = [s.answer() for s in streams]
    failures = [i for i, a in enumerate(answers) if a["status"] != 200 or a["end"] != "done" or a["errors"]
                or a["exception"] or a["completion_tokens"] != max_tokens]
    tokens = sum(a["completion_tokens"] or 0 for a in answers)
    return {"streams": len(streams), "failures": len(failures), "failed_streams": failures[:64],
            "failure_examples": [{k: answers[i][k] for k in ("status", "end", "exception", "errors",
                                                               "completion_tokens", "replica")}
                                 for i in failures[:5]],
            "id_lists_seen": sum(a["id_lists_seen"] for a in answers),
            "streams_with_several_ids_or_created": sum(a["distinct_ids"] > 1 or a["distinct_created"] > 1
                                                       for a in answers),
            "chat_streams_with_role_chunks_not_1": sum(a["role_chunks"] != 1 for i, a in enumerate(answers)
                                                       if streams[i].route.endswith("chat/completions")),
            "by_replica": dict(Counter(a["replica"] for a in answers)),
            "completion_tokens": tokens, "wall_s": info.get("wall_s"),
            "client_tok_per_s": round(tokens / info["wall_s"], 1) if info.get("wall_s") else None,
            **{k: v for k, v in info.items() if k != "wall_s"}}, answers


def compare(got: list[dict], ref: list[dict], victims: set[int] | None = None) -> dict:
    """Per stream: equal text? Where it first differs, and whether the rest restarts the reference's beginning."""
    diffs = []
    for i, (a, b) in enumerate(zip(got, ref)):
        if a["text"] == b["text"]:
            continue
        x, y = a["text"], b["text"]
        at = next((k for k in range(min(len(x), len(y))) if x[k] != y[k]), min(len(x), len(y)))
        diffs.append({"stream": i, "route": "chat" if i % 2 == 0 else "completions", "first_diff_char": at,
                      "len_got": len(x), "len_ref": len(y), "on_killed_replica": bool(victims and i in victims),
                      "rest_restarts_reference": bool(len(x) > at + 8 and y.startswith(x[at:at + 40][:len(y)])),
                      "got_at_diff": x[max(0, at - 20):at + 60], "ref_at_diff": y[max(0, at - 20):at + 60]})
    routes = Counter(d["route"] for d in diffs)
    on_victim = [d for d in diffs if d["on_killed_replica"]]
    return {"equal": len(got) - len(diffs), "differ": len(diffs), "differ_chat": routes["chat"],
            "differ_completions": routes["completions"], "differ_on_killed_replica": len(on_victim),
            "differ_elsewhere": len(diffs) - len(on_victim), "examples": diffs[:6],
            "all_differing": [(d["stream"], d["first_diff_char"], d["on_killed_replica"]) for d in diffs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--deployment", help="Serve deployment of the model (default: the model name)")
    parser.add_argument("--app", default="llm", help="Serve application name")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of all tokens held by the clients")
    parser.add_argument("--read-timeout", type=float, default=90)
    parser.add_argument("--run-wall-s", type=float, default=150)
    parser.add_argument("--wait-s", type=float, default=180, help="for the replicas before the runs")
    parser.add_argument("--recovery-s", type=float, default=0, help="for the killed replica's replacement")
    parser.add_argument("--deadline-s", type=float, default=0,
                        help="end by then (s from start): the recovery wait shrinks to leave a post run time")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app = App(args.url, args.model, args.deployment or re.sub(r"[^A-Za-z0-9._-]", "_", args.model), args.app)
    specs = bodies(args.model, args.streams, args.max_tokens)
    summary: dict = {"args": vars(args), "started_epoch": round(time.time(), 3)}
    texts: dict = {}

    def save(step: str) -> None:
        summary["last_step"] = step
        (out / "migrate_summary.json").write_text(json.dumps(summary, indent=1))
        (out / "migrate_texts.json").write_text(json.dumps(texts))
        print(f"[{time.strftime('%T')}] {step} done", flush=True)

    started = t = time.monotonic()
    while time.monotonic() - t < args.wait_s:
        known, pids = app.router_replicas(), app.replica_pids()
        if len(known) >= args.replicas and len(pids) >= args.replicas:
            break
        time.sleep(2)
    summary["wait"] = {"s": round(time.monotonic() - t, 1), "router_replicas": app.router_replicas(),
                       "replica_pids": app.replica_pids(), "replica_processes": app.replica_processes()}
    save("wait")
    if len(summary["wait"]["router_replicas"]) < args.replicas:
        print(f"only {len(summary['wait']['router_replicas'])} replica(s) listed", file=sys.stderr)
    warm = [(route, {**body, "max_tokens": 16}) for route, body in specs]
    summary["warmup"], _ = summarize(*_run(app, warm, args, None), 16)
    save("warmup")
    answers = {}
    for step in ("ref_a", "ref_b"):
        summary[step], answers[step] = summarize(*_run(app, specs, args, None), args.max_tokens)
        texts[step] = [a["text"] for a in answers[step]]
        save(step)
    summary["ref_b_vs_ref_a"] = compare(answers["ref_b"], answers["ref_a"])
    save("control")
    before = app.migrations()
    summary["kill"], answers["kill"] = summarize(*_run(app, specs, args, args.kill_at), args.max_tokens)
    texts["kill"] = [a["text"] for a in answers["kill"]]
    after = app.migrations()
    for _ in range(10):  # the counter is the router's own; allow a moment for the last hand-over's line
        if after is None or before is None or after > before:
            break
        time.sleep(1)
        after = app.migrations()
    victims = set(summary["kill"].get("victim_streams") or [])
    summary["migrations"] = {"before": before, "after": after,
                             "during_kill_run": None if before is None or after is None else after - before,
                             "victim_streams": len(victims)}
    summary["kill_vs_ref_a"] = compare(answers["kill"], answers["ref_a"], victims)
    summary["kill_vs_ref_b"] = compare(answers["kill"], answers["ref_b"], victims)
    save("kill")
    if args.deadline_s:  # leave the post run (at most run_wall_s, ~10 s here) its time
        args.recovery_s = min(args.recovery_s, args.deadline_s - (time.monotonic() - started) - 45)
    summary["recovery_budget_s"] = round(args.recovery_s, 1)
    if args.recovery_s > 0 and summary["kill"].get("killed_pid"):
        t = time.monotonic()
        killed = summary["kill"].get("killed_replica")
        while time.monotonic() - t < args.recovery_s:
            known, pids = app.router_replicas(), app.replica_pids()
            if len(known) >= args.replicas and len(pids) >= args.replicas and killed not in pids:
                summary["recovery"] = {"replaced_after_s": round(time.monotonic() - t, 1),
                                       "since_kill_s": round(time.time() - summary["kill"]["killed_at_epoch"], 1),
                                       "router_replicas": known, "replica_pids": pids}
                break
            time.sleep(2)
        else:
            summary["recovery"] = {"replaced_after_s": None, "waited_s": round(time.monotonic() - t, 1),
                                   "router_replicas": app.router_replicas(), "replica_pids": app.replica_pids()}
        save("recovery")
        if summary["recovery"]["replaced_after_s"] is not None:
            summary["post"], answers["post"] = summarize(*_run(app, specs, args, None), args.max_tokens)
            texts["post"] = [a["text"] for a in answers["post"]]
            summary["post_vs_ref_a"] = compare(answers["post"], answers["ref_a"])
            save("post")
    k = summary["kill"]
    summary["result"] = {"texts_equal_kill_vs_ref_a": summary["kill_vs_ref_a"]["differ"] == 0,
                         "differ_kill_vs_ref_a": summary["kill_vs_ref_a"]["differ"],
                         "differ_ref_b_vs_ref_a": summary["ref_b_vs_ref_a"]["differ"],
                         "client_failures_kill_run": k["failures"], "id_lists_seen": k["id_lists_seen"],
                         "migrations": summary["migrations"]["during_kill_run"],
                         "victim_streams": len(victims), "killed": bool(k.get("killed_pid"))}
    save("done")
    print(json.dumps(summary["result"], indent=1))
    return 0 if summary["result"]["texts_equal_kill_vs_ref_a"] and not k["failures"] else 1


def _run(app: App, specs, args, kill_at):
    streams, info = run_streams(app, specs, args.read_timeout, args.run_wall_s, kill_at, args.max_tokens)
    return streams, info


if __name__ == "__main__":
    sys.exit(main())
