"""LoRA adapters loaded at run time: `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` on the router.

A load is recorded in the registry first (so that a replica starting meanwhile loads it too, `app.adapters`), then
vLLM's own load route runs on every running replica of the base model. Unless every replica loaded it, it is
undone everywhere and vLLM's error is the answer. Each call runs once per replica: never replayed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from starlette.responses import PlainTextResponse, Response

from app.adapters import lora_base, register, unregister
from app.asgi import header, read_body
from app.config import AppConfig
from app.errors import APIError, bad_request, engine_failed, not_found, overloaded
from app.model_table import ModelTable
from app.routing import parse_json_object, require_api_key

LORA_ROUTES = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


class LoRAAdmin:
    def __init__(self, config: AppConfig, table: ModelTable, session: aiohttp.ClientSession, api_keys: list[str]):
        self.config, self.table, self.session, self.api_keys = config, table, session, api_keys

    async def __call__(self, scope, receive, send) -> None:
        try:
            require_api_key(header(scope, b"authorization"), self.api_keys)
            payload = parse_json_object(await read_body(scope, receive, self.config.limits.max_request_bytes))
            load = scope["path"] == "/v1/load_lora_adapter"
            response = await (self.load(payload) if load else self.unload(payload))
        except APIError as e:
            response = e.response()
        await response(scope, receive, send)

    async def load(self, payload: dict[str, Any]) -> Response:
        name, path = payload.get("lora_name"), payload.get("lora_path")
        if not (isinstance(name, str) and name and isinstance(path, str) and path):
            raise bad_request("Both 'lora_name' and 'lora_path' must be provided.")
        adapters = self.table.adapters
        base = lora_base(self.config, payload.get("model"))
        await adapters.refresh()
        adapters.check_new(name, base)
        previous, deployment = adapters.get(name), self.table.deployments[base.name]
        app = self.table.app_name
        await asyncio.to_thread(register, app, deployment, name, path)
        body = {k: v for k, v in payload.items() if k != "model"}
        answers = await self._on_replicas(base.name, "/v1/load_lora_adapter", body)
        failed = [r for r in answers.values() if r.status_code != 200]
        if answers and not failed:
            await adapters.refresh()
            return next(iter(answers.values()))
        if previous is not None:  # a failed load_inplace: back to the previous weights
            await asyncio.to_thread(register, app, deployment, name, previous.path)
            undo = ("/v1/load_lora_adapter", {"lora_name": name, "lora_path": previous.path, "load_inplace": True})
        else:
            await asyncio.to_thread(unregister, app, deployment, name)
            undo = ("/v1/unload_lora_adapter", {"lora_name": name})
        loaded = {rid for rid, r in answers.items() if r.status_code == 200}
        if loaded:
            await self._on_replicas(base.name, *undo, only=loaded)
        await adapters.refresh()
        if failed:
            return failed[0]
        return overloaded(f"The model `{base.name}` has no running replica to load the adapter on.").response()

    async def unload(self, payload: dict[str, Any]) -> Response:
        name = payload.get("lora_name")
        if not (isinstance(name, str) and name):
            raise bad_request("'lora_name' needs to be provided to unload a LoRA adapter.")
        adapters = self.table.adapters
        await adapters.refresh()
        known = adapters.get(name)
        if known is not None and known.listed:
            raise bad_request(f"The lora adapter '{name}' is listed in the app's config; remove it there.",
                              param="lora_name")
        base = lora_base(self.config, payload.get("model", known.base if known else None))
        if known is not None and known.base == base.name:
            await asyncio.to_thread(unregister, self.table.app_name, self.table.deployments[base.name], name)
        answers = await self._on_replicas(base.name, "/v1/unload_lora_adapter", {"lora_name": name})
        await adapters.refresh()
        unloaded = [r for r in answers.values() if r.status_code == 200]
        if unloaded:
            return unloaded[0]
        if known is not None:  # out of the registry; no replica had it
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
        return next(iter(answers.values()), not_found(f"The lora adapter '{name}' cannot be found.").response())

    async def _on_replicas(self, model: str, path: str, body: dict[str, Any],
                           only: set[str] | None = None) -> dict[str, Response]:
        """vLLM's answer to POST `path` from each running replica of `model`; one that refuses the connection is
        gone (Serve's controller has not said so yet) and left out."""
        urls = {rid: url for rid, url in self.table.pools[model].urls().items() if only is None or rid in only}

        async def call(url: str) -> Response | None:
            try:
                timeout = aiohttp.ClientTimeout(total=self.config.limits.request_timeout_s)
                async with self.session.post(f"{url}{path}", json=body, timeout=timeout) as r:
                    return Response(await r.read(), r.status, media_type=r.headers.get("content-type"))
            except aiohttp.ClientConnectorError:
                return None
            except (aiohttp.ClientError, TimeoutError) as e:
                return engine_failed(f"The engine failed to answer: {type(e).__name__}: {e}").response()

        answers = await asyncio.gather(*(call(url) for url in urls.values()))
        return {rid: answer for rid, answer in zip(urls, answers) if answer is not None}
