"""The router: one OpenAI base URL for every model, the application's ingress deployment.

With Ray Serve's HAProxy mode (`RAY_SERVE_ENABLE_HA_PROXY=1`) HAProxy hands client connections straight to each
router replica's own HTTP server. The router answers status routes itself (`app.status`), runs LoRA admin calls on
every replica (`app.lora_admin`) and relays everything else to an engine replica's own HTTP server
(`app.relay`). No Ray message carries request or response bytes. Which engine replicas run, and where, Serve's
controller pushes to the router (`app.replica_directory`, `app.model_table`).
"""

from __future__ import annotations

from typing import Any

import aiohttp

from app.asgi import lifespan
from app.config import AppConfig
from app.errors import APIError, not_found
from app.lora_admin import LORA_ROUTES, LoRAAdmin
from app.metrics import IngressMetrics
from app.model_table import ModelTable
from app.relay import Relay
from app.status import Status


class Router:
    """The router's ASGI app over a model table; free of Ray Serve (unit tests drive it with fake engines)."""

    def __init__(self, config: AppConfig, table: ModelTable, session: aiohttp.ClientSession):
        keys = config.resolved_api_keys()
        self.metrics = IngressMetrics()
        self.status = Status(table, self.metrics, session, keys)
        self.lora = LoRAAdmin(config, table, session, keys)
        self.relay = Relay(config, table, self.metrics, session, keys)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return
        handler = self.status.routes.get((scope["method"], scope["path"]))
        if handler is not None:
            try:
                response = await handler(scope)
            except APIError as e:
                response = e.response()
            return await response(scope, receive, send)
        if scope["method"] == "POST" and scope["path"] in LORA_ROUTES:
            return await self.lora(scope, receive, send)
        if scope["method"] != "POST":
            return await not_found(f"Not found: {scope['method']} {scope['path']}").response()(scope, receive, send)
        await self.relay.forward(scope, receive, send)


def new_session() -> aiohttp.ClientSession:
    """Keep-alive connections to the engines, no limit on their number, bytes passed on undecoded."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,
    )


class Ingress:
    """The router deployment (bound by `builder`): an ASGI app built per replica."""

    def __init__(self, config: AppConfig, deployments: dict[str, str], backends: dict[str, str],
                 engines: dict[str, Any] | None = None):
        self.config, self.deployments, self.backends = config, deployments, backends
        # Bound engine deployments arrive as DeploymentHandles: their request routers receive the replica pushes.
        self.engines = engines or {}

    async def __serve_build_asgi_app__(self):
        from ray import serve

        table = ModelTable(self.config, serve.get_replica_context().app_name, self.deployments, self.backends)
        table.follow()
        for handle in self.engines.values():
            if not handle.is_initialized:
                handle._init()  # starts its router; Serve's controller pushes replica changes to it (ray.serve.llm too)
        self.session = new_session()
        return Router(self.config, table, self.session)

    async def __del__(self):
        """Serve calls this once the router's requests have drained."""
        if getattr(self, "session", None) is not None:
            await self.session.close()


def ingress_class():
    """The Ingress class made an ASGI ingress (its app is built per replica), ready for `serve.deployment`."""
    from ray import serve

    return serve.ingress()(Ingress)
