"""JSON records in Ray's internal KV store, one per `app/deployment/name` key: the engine replicas' URLs
(`app.replicas`) and the LoRA adapters loaded at run time (`app.adapters`)."""

from __future__ import annotations

import json
from typing import Any


def key(app: str, deployment: str, name: str) -> str:
    return f"{app}/{deployment}/{name}"


def put(namespace: str, app: str, deployment: str, name: str, record: dict[str, Any]) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key(app, deployment, name), json.dumps(record), namespace=namespace)


def delete(namespace: str, app: str, deployment: str, name: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key(app, deployment, name), namespace=namespace)


def records(namespace: str, app: str, deployment: str) -> dict[str, dict[str, Any]]:
    """name -> record of every key under `app/deployment/`."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    prefix = key(app, deployment, "")
    found = {}
    for full in _internal_kv_list(prefix, namespace=namespace):
        value = _internal_kv_get(full, namespace=namespace)
        if value:
            found[full.decode()[len(prefix):]] = json.loads(value)
    return found
