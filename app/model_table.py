"""The router's table of models: for each, its engine deployment, its backend and the pool of its running
replicas, kept current by Serve's controller (`app.replica_directory`), plus the LoRA adapters it serves."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from app import replica_directory
from app.adapters import AdapterTable
from app.config import AppConfig
from app.prefix_routing import affinity
from app.replicas import ReplicaPool
from app.routing import ServedRoutes

logger = logging.getLogger("ray.serve")


@dataclass
class ModelTable:
    config: AppConfig
    app_name: str
    deployments: dict[str, str]  # model -> its engine deployment's name
    backends: dict[str, str]  # model -> "cpu" | "gpu"
    pools: dict[str, ReplicaPool] = field(init=False)
    adapters: AdapterTable = field(init=False)

    def __post_init__(self):
        self.pools = {
            m.name: ReplicaPool(m.name, m.deployment.max_ongoing_requests, m.deployment.max_queued_requests,
                                affinity=affinity(m.deployment.request_router),
                                no_replica_wait_s=self.config.limits.starting_model_wait_s)
            for m in self.config.models
        }
        self.adapters = AdapterTable(self.config, self.deployments, self.app_name)

    def follow(self) -> None:
        """Every pool follows its deployment's running replicas as Serve's controller pushes them."""
        for model, deployment in self.deployments.items():
            replica_directory.subscribe(self.app_name, deployment, self._on_change(model))

    def _on_change(self, model: str):
        def update(running: dict[str, dict]) -> None:
            pool = self.pools[model]
            logger.info("model %s: running replicas %s", model, sorted(running))
            pool.update(running)
            if running:
                pool.problem = None
        return update

    def served(self) -> dict[str, ServedRoutes]:
        """model -> the routes its replicas serve, for the models with a replica up."""
        return {name: pool.routes for name, pool in self.pools.items() if pool.routes is not None}

    async def explain_missing(self) -> None:
        """Sets each pool without replicas to Serve's own message for its deployment (e.g. the engine's start-up
        error). Asked of Serve's controller only when a status needs it, never in a loop."""
        if all(pool.replicas for pool in self.pools.values()):
            return
        from ray.serve.context import _get_global_client

        try:
            details = await _get_global_client()._controller.get_serve_instance_details.remote()
        except Exception:  # noqa: BLE001 - e.g. a controller restarting: the status says "starting"
            logger.exception("could not ask Serve's controller about the deployments")
            return
        listed = details.get("applications", {}).get(self.app_name, {}).get("deployments", {})
        for model, pool in self.pools.items():
            status = listed.get(self.deployments[model], {})
            if not pool.replicas and status.get("status") not in (None, "HEALTHY"):
                pool.problem = status.get("message") or status.get("status")

