"""Which model serves a request: pure decisions over the config, free of Ray so they unit-test fast."""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.config import AppConfig, ModelSpec, RequestLimits
from app.errors import bad_request, not_found, unauthorized


class ServedRoutes:
    """The POST routes one model's vLLM app serves (its path templates, e.g. `/v1/responses/{response_id}/cancel`).

    Engine replicas publish them from the app vLLM built for the model's tasks, so a new vLLM release brings
    its routes along and a model is offered exactly the routes `vllm serve` would offer for it."""

    def __init__(self, templates: list[str]):
        self.templates = sorted(templates)
        self._patterns = [re.compile(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(t)) + "$") for t in self.templates]

    def __contains__(self, path: str) -> bool:
        return any(p.match(path) for p in self._patterns)


@dataclass(frozen=True)
class RoutedRequest:
    model: ModelSpec
    stream: bool
    adapter: str | None = None  # the LoRA adapter named in `model`; `model` is then its base


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.") from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.")
    return payload


def route_request(config: AppConfig, route: str, payload: dict[str, Any],
                  served: Mapping[str, ServedRoutes], adapters: Mapping[str, str] | None = None) -> RoutedRequest:
    """The model named by `payload` (or the only model that serves `route` when none is named); a LoRA adapter's
    name (`adapters`: adapter -> base model) routes to its base model.

    `served` holds the routes of each model whose replicas are up; a model not in it is still starting."""
    adapters = adapters or {}
    adapter = None
    able = [m for m in config.models if m.name in served and route in served[m.name]]
    name = payload.get("model")
    if name is None:
        if len(able) != 1:
            if not able and served:
                raise not_found(f"No model serves POST {route}.")
            raise bad_request(f"'model' is required: one of {[m.name for m in able]}", param="model")
        model = able[0]
    elif not isinstance(name, str):
        raise bad_request("'model' must be a string.", param="model")
    else:
        model = config.model(name)
        if model is None and name in adapters:
            model, adapter = config.model(adapters[name]), name
        if model is None:
            available = [m.name for m in config.models] + sorted(adapters)
            raise not_found(f"The model `{name}` does not exist. Available: {available}", param="model")
    if model.name in served and route not in served[model.name]:
        if not able:
            raise not_found(f"No model serves POST {route}.")
        raise bad_request(
            f"The model `{model.name}` is a {model.task} model and does not serve {route}; models that do: "
            f"{[m.name for m in able]}.", param="model"
        )
    stream = payload.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_request("'stream' must be a boolean.", param="stream")
    return RoutedRequest(model, bool(stream), adapter)


def check_limits(payload: dict[str, Any], limits: RequestLimits) -> None:
    """Raises 400 naming the limit when a request asks for more than this server allows."""
    n = payload.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) else 1  # vLLM rejects bad types itself
    if n > limits.max_n:
        raise bad_request(f"'n' is {n}, above this server's limit of {limits.max_n} (limits.max_n).", param="n")
    prompts = _prompt_count(payload.get("prompt", payload.get("input")))
    if prompts > limits.max_prompts:
        raise bad_request(
            f"The request has {prompts} prompts, above this server's limit of {limits.max_prompts} "
            "(limits.max_prompts).",
            param="prompt" if "prompt" in payload else "input",
        )
    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        total = max_tokens * n * max(prompts, 1)
        if total > limits.max_total_tokens:
            raise bad_request(
                f"max_tokens x n x prompts is {total}, above this server's limit of {limits.max_total_tokens} "
                "tokens per request (limits.max_total_tokens).",
                param="max_tokens",
            )


def _prompt_count(prompt: Any) -> int:
    """A string or a token list is one prompt; a list of them is several."""
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return 1 if prompt is not None else 0


def spill_target(model: ModelSpec, config: AppConfig, in_flight: Mapping[str, int]) -> ModelSpec:
    """The model that serves a request for `model`: its opted-in fallback once it is busy, else itself."""
    if model.fallback is None or in_flight.get(model.name, 0) < model.fallback_after:
        return model
    fallback = config.model(model.fallback)
    # Spilling onto a fallback at least as busy as the primary would only move the queue.
    return fallback if in_flight.get(fallback.name, 0) < in_flight.get(model.name, 0) else model


def with_model(payload: dict[str, Any], name: str) -> bytes:
    """The request body re-addressed to another model (only spilled requests pay this re-serialization)."""
    return json.dumps({**payload, "model": name}).encode()


def require_api_key(authorization: str | None, keys: list[str]) -> None:
    """Raises 401 unless `Authorization: Bearer <key>` names one of `keys` (no keys: auth off)."""
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise unauthorized()
    token_bytes = token.strip().encode()
    # Compare against every key so timing says nothing about which (or whether one) matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token_bytes, key.encode())
    if not matched:
        raise unauthorized()

