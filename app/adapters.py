"""LoRA adapters: which base model serves an adapter, and the registry of adapters loaded at run time.

Adapters listed in the config (`lora_adapters`) are vLLM's `lora_modules`: every engine replica loads them at
start. Adapters loaded at run time (`POST /v1/load_lora_adapter` on the router) are recorded in Ray's KV store
under the app, the base model's deployment and the adapter name (one JSON record each, removed on unload), so
that every engine replica of the base model loads them, including one that starts later, and every router replica
knows them: a router re-reads the registry when a request names a model it does not know and when it lists the
models, never in a loop. Pure logic apart from the KV calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass

from app.config import AppConfig, ModelSpec
from app.errors import bad_request, not_found

KV_NAMESPACE = "llm_app_lora"


def _key(app: str, deployment: str, adapter: str) -> str:
    return f"{app}/{deployment}/{adapter}"


def register(app: str, deployment: str, adapter: str, path: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_key(app, deployment, adapter), json.dumps({"lora_path": path}), namespace=KV_NAMESPACE)


def unregister(app: str, deployment: str, adapter: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(_key(app, deployment, adapter), namespace=KV_NAMESPACE)


def registered(app: str, deployment: str) -> dict[str, str]:
    """adapter name -> path of the adapters loaded at run time on `deployment`."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    prefix = _key(app, deployment, "")
    found = {}
    for full in _internal_kv_list(prefix, namespace=KV_NAMESPACE):
        value = _internal_kv_get(full, namespace=KV_NAMESPACE)
        if value:
            found[full.decode()[len(prefix):]] = json.loads(value)["lora_path"]
    return found


@dataclass(frozen=True)
class Adapter:
    name: str
    base: str  # the model that serves it
    path: str
    listed: bool  # in the config (loaded at start), not loaded at run time


def listed_adapters(config: AppConfig) -> dict[str, Adapter]:
    return {name: Adapter(name, m.name, path, True) for m in config.models for name, path in m.lora_adapters.items()}


def lora_base(config: AppConfig, requested: object) -> ModelSpec:
    """The base model of a load request: the one it names in `model`, else the app's only model with LoRA."""
    able = [m.name for m in config.models if m.lora_enabled]
    if requested is None:
        if len(able) != 1:
            choices = f"one of {able}" if able else "no model of this app has LoRA enabled"
            raise bad_request(f"'model' (the base model of the adapter) is required: {choices}", param="model")
        return config.model(able[0])
    if not isinstance(requested, str):
        raise bad_request("'model' must be a string.", param="model")
    model = config.model(requested)
    if model is None:
        raise not_found(f"The model `{requested}` does not exist. Available: {[m.name for m in config.models]}",
                        param="model")
    if not model.lora_enabled:
        raise bad_request(f"The model `{requested}` does not serve LoRA adapters (set `enable_lora: true` in its "
                          f"engine_args or list `lora_adapters` in its config); models that do: {able}", param="model")
    return model


class AdapterTable:
    """The adapters one router replica knows: the config's, plus the registry's (refreshed)."""

    def __init__(self, config: AppConfig, deployments: Mapping[str, str], app: str):
        self.config, self.deployments, self.app = config, deployments, app
        self.listed = listed_adapters(config)
        self.loaded: dict[str, Adapter] = {}  # at run time, as last read from the registry

    def get(self, name: str) -> Adapter | None:
        return self.listed.get(name) or self.loaded.get(name)

    def all(self) -> list[Adapter]:
        return [*self.listed.values(), *self.loaded.values()]

    def bases(self) -> dict[str, str]:
        """adapter name -> base model name."""
        return {a.name: a.base for a in self.all()}

    async def refresh(self) -> None:
        models = [m.name for m in self.config.models if m.lora_enabled]
        if models:
            found = await asyncio.to_thread(self._read, models)
            self.loaded = {name: Adapter(name, model, path, False)
                           for model, adapters in found.items() for name, path in adapters.items()}

    async def learn(self, name: object) -> None:
        """Re-reads the registry when a request names a model this router does not know: another router replica
        may have loaded it as an adapter."""
        if isinstance(name, str) and self.config.model(name) is None and self.get(name) is None:
            await self.refresh()

    def check_new(self, name: str, base: ModelSpec) -> None:
        """Raises 400 for a run-time adapter name that another model, or the config, already uses."""
        if self.config.model(name) is not None:
            raise bad_request(f"The lora adapter '{name}' conflicts with a served base model.", param="lora_name")
        known = self.get(name)
        if known is not None and known.listed:
            raise bad_request(f"The lora adapter '{name}' is listed in the app's config; change it there.",
                              param="lora_name")
        if known is not None and known.base != base.name:
            raise bad_request(f"The lora adapter '{name}' is loaded on the model `{known.base}`; unload it first.",
                              param="lora_name")

    def _read(self, models: list[str]) -> dict[str, dict[str, str]]:
        return {model: registered(self.app, self.deployments[model]) for model in models}
