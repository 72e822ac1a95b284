"""The engine's own process: `vllm serve` for one model, started and watched by its engine replica
(`app.engine_process`). `python -m app.engine_main <spec json>`, with the listening socket as an inherited fd.

It runs vLLM's own API server (the same arguments, app, uvicorn and engine client as `vllm serve`) with one
middleware added through vLLM's `--middleware` option: the replica's admission limit (`app.admission`), which the
replica steers over `CONTROL_PATH`. The engine core is started as vLLM's library does (forked where vLLM allows: GPUs;
spawned on CPU, where vLLM's CPU platform asks for it) and forks its worker (`app.worker_fork`).
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import sys

from app.admission import Admission

CONTROL_PATH = "/llm-app/replica"  # the replica's own calls: limit, state, load; never routed (not a vLLM route)
TOKEN_ENV = "LLM_APP_CONTROL_TOKEN"  # a secret per replica: only it may call CONTROL_PATH
TOKEN_HEADER = b"x-llm-app-token"
LIMIT_ENV = "LLM_APP_MAX_ONGOING"


class ReplicaAdmission(Admission):
    """`app.admission` inside vLLM's app (added by class, as vLLM's `--middleware` does), with the replica's control
    route: GET or POST `{"max_ongoing_requests": n, "closed": reason}` answers what the replica needs to know."""

    def __init__(self, app):
        super().__init__(app, lambda: self.limit)
        self.limit = int(os.environ[LIMIT_ENV])
        self.token = os.environ[TOKEN_ENV].encode()
        self._model: dict | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == CONTROL_PATH:
            return await self.control(scope, receive, send)
        return await super().__call__(scope, receive, send)

    async def control(self, scope, receive, send) -> None:
        from app.asgi import header, read_body

        if not hmac.compare_digest((header(scope, TOKEN_HEADER) or "").encode(), self.token):
            return await respond(send, 403, {"error": "not this replica's"})
        if scope["method"] == "POST":
            change = json.loads(await read_body(scope, receive, 4096) or b"{}")
            self.limit = int(change.get("max_ongoing_requests", self.limit))
            self.closed = change.get("closed", self.closed)
        await respond(send, 200, {"ongoing": self.count, "limit": self.limit, "closed": self.closed,
                                  "routes": post_routes(scope["app"]), **await self.model(scope["app"])})

    async def model(self, app) -> dict:
        """What the engine serves: its tasks and max_model_len (asked once)."""
        if self._model is None:
            engine = app.state.engine_client
            self._model = {"tasks": list(await engine.get_supported_tasks()),
                           "max_model_len": engine.model_config.max_model_len}
        return self._model


def post_routes(app) -> list[str]:
    """The POST routes of vLLM's app for this model's tasks (what a router may send here)."""
    return sorted({r.path for r in app.routes if "POST" in (getattr(r, "methods", None) or ())})


async def respond(send, status: int, body: dict) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    from app import process_guard, worker_fork

    process_guard.die_with(spec["parent_pid"])  # and its engine core and worker with it (`app.process_guard`)
    # vLLM forks its engine core where it may (GPUs; CPU engines spawn it): it must load vLLM's plugins again.
    os.register_at_fork(after_in_child=worker_fork.load_plugins_again)  # no OpenMP binding there
    import uvloop

    from app import vllm_api

    args = vllm_api.server_args(spec["source"], spec["name"], spec["overrides"], spec["lora_modules"])
    args.host, args.port = spec["host"], spec["port"]
    args.middleware = [*(args.middleware or []), "app.engine_main.ReplicaAdmission"]
    args.disable_uvicorn_access_log, args.uvicorn_log_level = True, "warning"
    sock = socket.socket(fileno=spec["fd"])
    uvloop.run(vllm_api.serve(args, sock))


if __name__ == "__main__":
    main(sys.argv[1])
