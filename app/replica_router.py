"""Serve's request-router plug-in for engine deployments (`request_router_config.request_router_class`): it
receives the running replicas that Serve's controller pushes to a DeploymentHandle and announces them to this
process's router (`app.replica_directory`).

Serve pickles this module by value into every handle's process, so it keeps no state of its own and reaches the
directory through an import at call time (the real, shared module).
"""

from __future__ import annotations

from ray.serve.request_router import RequestRouter


class EngineReplicaRouter(RequestRouter):
    def update_replicas(self, replicas) -> None:
        from app import replica_directory

        super().update_replicas(replicas)
        published = {r.replica_id.unique_id: r.replica_metadata for r in replicas}
        replica_directory.announce(self._deployment_id.app_name, self._deployment_id.name,
                                   {rid: meta for rid, meta in published.items() if "url" in meta})

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        # Only DeploymentHandle calls come here (none carry requests: the router picks from its pools itself).
        return [candidate_replicas]
