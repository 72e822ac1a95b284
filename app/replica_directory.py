"""Which engine replicas are RUNNING and where their own HTTP servers listen, as Ray Serve's controller pushes it.

Every engine deployment names `app.replica_router.EngineReplicaRouter` as its Serve request router. Each router
replica holds a DeploymentHandle per engine deployment; Serve's controller pushes every change of that deployment's
running replicas (long poll), with the URL and routes each replica returned from its `record_replica_metadata`, to the
handle's request router, which hands them to this process's subscribers (the router's `ReplicaPool`s). Nothing
polls and nothing is kept in Ray's KV store: a replica that dies or stops leaves the push once Serve's controller
knows (its health check), a new one joins once RUNNING.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

Replicas = dict[str, dict]  # replica id -> its metadata {"url", "routes"}

_lock = threading.Lock()  # Serve's handle routers run on their own event loop thread
_subscribers: dict[tuple[str, str], list[tuple[asyncio.AbstractEventLoop, Callable[[Replicas], None]]]] = {}
_latest: dict[tuple[str, str], Replicas] = {}


def subscribe(app: str, deployment: str, on_change: Callable[[Replicas], None]) -> None:
    """Calls `on_change` on the caller's event loop with the deployment's running replicas, now if they are known,
    and again at every change."""
    loop = asyncio.get_running_loop()
    with _lock:
        _subscribers.setdefault((app, deployment), []).append((loop, on_change))
        latest = _latest.get((app, deployment))
    if latest is not None:
        on_change(latest)


def announce(app: str, deployment: str, replicas: Replicas) -> None:
    with _lock:
        _latest[(app, deployment)] = replicas
        subscribers = list(_subscribers.get((app, deployment), []))
    for loop, on_change in subscribers:
        loop.call_soon_threadsafe(on_change, replicas)

