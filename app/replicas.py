"""Which replica of a model takes the next request, as one router replica sees them.

A router replica keeps one `ReplicaPool` per model, fed with the RUNNING replicas that Serve's controller pushes
(`app.replica_directory`; a replica being stopped or replaced gets no new requests but finishes its own). It
picks the least loaded replica by its own count, bounds its own requests per replica at `max_ongoing_requests`
and its wait at `max_queued_requests` (then 503). The engine replica enforces the same limit across all routers
(`app.admission`): a replica that refuses as full is skipped for a moment and the request goes to another or
waits. With a prefix-aware policy (`app.prefix_routing`) a prompt goes where its prefix went before, balanced
against load. Pure logic, free of Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

from app.prefix_routing import PrefixAffinity
from app.routing import ServedRoutes

logger = logging.getLogger("ray.serve")

RETRY_DOWN_AFTER_S = 5.0
REFUSED_PAUSE_S = 0.05  # a replica that refused as full gets one probing request from this router this often


class NoCapacity(Exception):
    """Every replica is at max_ongoing_requests and the wait queue is full (or there is no replica)."""


@dataclass
class Replica:
    replica_id: str
    url: str
    ongoing: int = 0  # this router's requests on it
    down_since: float | None = None  # set when a connection to it failed
    full: bool = False  # it refused a request as full (other routers' requests fill it too)
    refused_until: float = 0.0  # while full: when this router may probe it with one request again

    def retry_at(self) -> float:
        """When this router may send it a request again: after its refusal pause and its down period (0: now)."""
        return max(self.refused_until if self.full else 0.0,
                   0.0 if self.down_since is None else self.down_since + RETRY_DOWN_AFTER_S)

    def available(self, now: float) -> bool:
        return now >= self.retry_at()


@dataclass
class ReplicaPool:
    """The replicas of one model as seen by one router replica."""

    model: str
    max_ongoing: int
    max_queued: int  # -1: unbounded
    replicas: dict[str, Replica] = field(default_factory=dict)
    waiting: int = 0
    routes: ServedRoutes | None = None  # known once a replica published them
    problem: str | None = None  # Ray Serve's message while the deployment is not healthy
    affinity: PrefixAffinity | None = None  # prefix-aware choice (deployment.request_router); None: least loaded
    no_replica_wait_s: float = math.inf  # while no replica runs: the longest wait (limits.starting_model_wait_s)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def update(self, running: dict[str, dict]) -> None:
        """Set the routable replicas (replica id -> {"url", "routes"}); those gone finish what they have."""
        for replica_id in list(self.replicas):
            if replica_id not in running:
                del self.replicas[replica_id]
        for replica_id, info in running.items():
            known = self.replicas.get(replica_id)
            if known is None or known.url != info["url"]:
                self.replicas[replica_id] = Replica(replica_id, info["url"])
            if self.routes is None or self.routes.templates != sorted(info["routes"]):
                self.routes = ServedRoutes(info["routes"])
        if self.affinity is not None:
            self.affinity.follow(self.replicas)
        self._notify()

    def urls(self) -> dict[str, str]:
        return {r.replica_id: r.url for r in self.replicas.values()}

    def pick(self, prompt: str | None = None) -> Replica | None:
        """An available replica with a free slot: the least loaded, or the prefix-aware choice for `prompt`."""
        now = time.monotonic()
        free = [r for r in self.replicas.values() if r.available(now) and r.ongoing < self.max_ongoing]
        if not free:
            return None
        chosen = min(free, key=lambda r: r.ongoing) if self.affinity is None or not prompt else \
            self.affinity.choose(free, prompt)
        if chosen.full:  # one probe at a time, not every waiting request at once
            chosen.refused_until = now + REFUSED_PAUSE_S
        return chosen

    @contextlib.asynccontextmanager
    async def slot(self, timeout_s: float, prompt: str | None = None):
        """A replica with a free slot, held for the block; waits in a bounded queue, else NoCapacity.
        `prompt`: the text the request prefills, for prefix-aware choice."""
        replica = self.pick(prompt)
        if replica is None:
            if 0 <= self.max_queued <= self.waiting:
                raise NoCapacity(self._why())
            replica = await self._wait(timeout_s if self.replicas else min(timeout_s, self.no_replica_wait_s), prompt)
        if self.affinity is not None and prompt:
            self.affinity.record(prompt, replica.replica_id)
        replica.ongoing += 1
        try:
            yield replica
        finally:
            replica.ongoing -= 1
            if self.waiting:
                self._notify()

    def mark_refused(self, replica: Replica) -> None:
        replica.full, replica.refused_until = True, time.monotonic() + REFUSED_PAUSE_S

    def mark_accepted(self, replica: Replica) -> None:
        if replica.full:
            replica.full = False
            self._notify()

    def mark_down(self, replica: Replica, why: str = "refused a connection") -> None:
        replica.down_since = time.monotonic()
        logger.warning("model %s: replica %s at %s %s", self.model, replica.replica_id, replica.url, why)

    async def _wait(self, timeout_s: float, prompt: str | None) -> Replica:
        self.waiting += 1
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                while (replica := self.pick(prompt)) is None:
                    # Woken by a slot of this router's coming free or a new replica, else when a pause or a
                    # down period ends.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._next_pause_end()):
                            await self._changed.wait()
                return replica
        except TimeoutError:
            raise NoCapacity(f"{self._why()} No slot came free within {timeout_s:g} s.") from None
        finally:
            self.waiting -= 1

    def _next_pause_end(self) -> float | None:
        """Seconds until a replica that refused as full, or was marked down, may be tried again (None: none)."""
        now = time.monotonic()
        pauses = [at - now for at in map(Replica.retry_at, self.replicas.values()) if at > now]
        return max(min(pauses), 0.001) if pauses else None

    def _notify(self) -> None:
        async def wake():
            async with self._changed:
                self._changed.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop (unit tests of update())
            asyncio.get_running_loop().create_task(wake())

    def _why(self) -> str:
        if not self.replicas:
            return f"The model `{self.model}` has no running replica: {self.problem or 'starting'}"
        return (f"The model `{self.model}` is overloaded: {len(self.replicas)} replica(s) at max_ongoing_requests "
                f"({self.max_ongoing}) and {self.waiting} request(s) waiting (max_queued_requests).")

