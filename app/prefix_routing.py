"""Prefix-aware replica choice: ray.serve.llm's PrefixCacheAffinityRouter policy, on our direct HTTP path.

Ray's router is a Serve `RequestRouter`: it chooses replicas for `DeploymentHandle` calls, and our router sends
requests to each replica's own HTTP server instead, so only its policy carries over. The text tree is ray.llm's
own `PrefixTree` (an internal module: imported here and nowhere else), used in-process by one router replica:
its lock is uncontended on one event loop, and eviction runs right after an insert instead of in its thread.
One method is replaced (`_shared_prefix_count`, see `_Tree`) because it costs ~1 ms per 4,000 matching characters.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree

from app.config import RequestRouterOptions

if TYPE_CHECKING:
    from app.replicas import Replica

PROMPT_FIELDS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}


def prompt_text(route: str, payload: dict[str, Any]) -> str | None:
    """The text a request prefills: chat messages (role and content, in order) or the completion prompt (the first
    of a list). None for other routes (e.g. /tokenize, which fills no cache) and for token-id prompts."""
    field = PROMPT_FIELDS.get(route)
    value = payload.get(field) if field else None
    if field == "prompt":
        value = value[0] if isinstance(value, list) and value else value
        return value if isinstance(value, str) else None
    if not isinstance(value, list):
        return None
    return "".join(f"{m.get('role', '')}:{_content_text(m.get('content'))}\n" for m in value if isinstance(m, dict))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only their text counts
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


class _Tree(PrefixTree):
    @staticmethod
    def _shared_prefix_count(a: str, b: str) -> int:
        """Length of the common prefix, by bisection over slice comparisons (done in C): os.path.commonprefix, which
        ray.llm uses, compares character by character in Python, on every node of every insert and match."""
        lo, hi = 0, min(len(a), len(b))  # invariant: a[:lo] == b[:lo]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if a[lo:mid] == b[lo:mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo


class PrefixAffinity:
    """Which replica should prefill a prompt, from the prompts each replica was given before."""

    def __init__(self, options: RequestRouterOptions):
        self.options = options
        self.tree = _Tree()

    def follow(self, replica_ids: Iterable[str]) -> None:
        """Track exactly these replicas: new ones start with an empty record, departed ones lose theirs."""
        current = list(replica_ids)
        known = self.tree.tenant_to_char_count
        gone = [rid for rid in known if rid not in current]
        if gone:
            self.tree.remove_tenants(gone)
        new = [rid for rid in current if rid not in known]
        if new:
            self.tree.add_tenants(new, time.time())

    def choose(self, candidates: Sequence[Replica], text: str) -> Replica:
        """One of `candidates` (replicas with a free slot, at least one) for a prompt starting with `text`."""
        least = min(candidates, key=_load)
        if max(r.ongoing for r in candidates) - least.ongoing > self.options.imbalanced_threshold:
            return least
        by_id = {r.replica_id: r for r in candidates}
        matched, owners = self.tree.prefix_match(text, list(by_id))
        if owners and len(matched) >= self.options.match_rate_threshold * len(text):
            return min((by_id[rid] for rid in owners), key=_load)
        sizes = self.tree.tenant_to_char_count
        return min(candidates, key=lambda r: (sizes.get(r.replica_id, 0), r.ongoing))

    def record(self, text: str, replica_id: str) -> None:
        """`replica_id` prefills `text`; its record is cut back to the target (least recently used first) once it
        grows past the threshold."""
        self.tree.insert(text, replica_id, time.time())
        size = self.tree.tenant_to_char_count.get(replica_id, 0)
        if size > self.options.eviction_threshold_chars:
            self.tree.evict_tenant_by_lru(replica_id, size - self.options.eviction_target_chars)

    def recorded_chars(self, replica_id: str) -> int:
        return self.tree.tenant_to_char_count.get(replica_id, 0)


def affinity(options: RequestRouterOptions) -> PrefixAffinity | None:
    """The prefix-aware chooser for a model's options, or None for plain least loaded."""
    return PrefixAffinity(options) if options.policy == "prefix_aware" else None


def _load(replica: Replica) -> int:
    return replica.ongoing
