"""Unit tests for prefix-aware replica choice (`app.prefix_routing`) and its use by `ReplicaPool`: the semantics of
ray.serve.llm's PrefixCacheAffinityRouter (affinity, imbalance, smallest record, replicas that leave, eviction)."""

from __future__ import annotations

import asyncio

import pytest

from app.config import RequestRouterOptions
from app.prefix_routing import PrefixAffinity, prompt_text
from app.replicas import ReplicaPool

ROUTES = ["/v1/chat/completions"]
SYSTEM = "You are a helpful assistant. " * 40  # a long shared prefix (1,160 characters)


def running(*ids: str) -> dict[str, dict]:
    return {rid: {"url": f"http://10.0.0.1:{9000 + i}", "routes": ROUTES} for i, rid in enumerate(ids)}


def prefix_pool(ids=("a", "b"), max_ongoing=64, **options) -> ReplicaPool:
    p = ReplicaPool("m", max_ongoing, 16, affinity=PrefixAffinity(RequestRouterOptions(policy="prefix_aware",
                                                                                       **options)))
    p.update(running(*ids))
    return p


async def served_by(p: ReplicaPool, prompt: str) -> str:
    async with p.slot(1, prompt) as replica:
        return replica.replica_id


def test_prompt_text_of_chat_and_completions():
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]}]}
    assert prompt_text("/v1/chat/completions", chat) == "system:Be brief.\nuser:Hi\n"
    assert prompt_text("/v1/completions", {"prompt": "Once upon"}) == "Once upon"
    assert prompt_text("/v1/completions", {"prompt": ["first", "second"]}) == "first"
    assert prompt_text("/v1/completions", {"prompt": [1, 2, 3]}) is None  # token ids: no text to match
    assert prompt_text("/tokenize", {"prompt": "Once upon"}) is None  # fills no cache
    assert prompt_text("/v1/chat/completions", {"messages": "not a list"}) is None


def test_same_prefix_goes_to_the_same_replica_and_distinct_prefixes_spread():
    async def main():
        p = prefix_pool()
        first = await served_by(p, SYSTEM + "question 0")
        assert {await served_by(p, SYSTEM + f"question {i}") for i in range(1, 6)} == {first}
        other = await served_by(p, "A different system prompt entirely. " * 30)
        assert other != first  # the replica with the smaller record takes a new prefix
        assert await served_by(p, "A different system prompt entirely. " * 30 + "more") == other

    asyncio.run(main())


@pytest.mark.parametrize(("knobs", "owner_ongoing", "picked"), [
    ({"imbalanced_threshold": 2}, 2, "a"),  # affinity holds while the owner is somewhat busier
    ({"imbalanced_threshold": 2}, 3, "b"),  # imbalanced load goes to the least loaded replica
    ({"max_ongoing": 1}, 1, "b"),  # a full owner is passed over
])
def test_the_prefix_owner_wins_unless_it_is_too_busy(knobs, owner_ongoing, picked):
    p = prefix_pool(**knobs)
    p.affinity.record(SYSTEM, "a")
    p.replicas["a"].ongoing = owner_ongoing
    assert p.pick(SYSTEM + "next").replica_id == picked


def test_a_low_match_rate_goes_to_the_smallest_record():
    p = prefix_pool(match_rate_threshold=0.5)
    p.affinity.record("You are " + "x" * 100, "a")  # shares only "You are " with the prompt below
    p.affinity.record("z" * 50, "b")
    p.replicas["b"].ongoing = 1  # load is not what decides here
    assert p.pick(SYSTEM).replica_id == "b"


def test_without_a_prompt_the_least_loaded_replica_is_chosen():
    p = prefix_pool()
    p.affinity.record(SYSTEM, "a")
    p.replicas["a"].ongoing = 1
    assert p.pick(None).replica_id == "b"


def test_a_replica_that_leaves_loses_its_record_and_a_new_one_starts_empty():
    async def main():
        p = prefix_pool()
        owner = await served_by(p, SYSTEM + "q")
        survivor = "b" if owner == "a" else "a"
        p.update(running(survivor, "c"))
        assert p.affinity.recorded_chars(owner) == 0 and owner not in p.affinity.tree.tenant_to_char_count
        assert p.affinity.recorded_chars("c") == 0
        assert await served_by(p, SYSTEM + "q2") in {survivor, "c"}

    asyncio.run(main())


def test_records_are_evicted_least_recently_used_first_within_the_bound():
    affinity = PrefixAffinity(RequestRouterOptions(policy="prefix_aware", eviction_threshold_chars=10_000,
                                                   eviction_target_chars=8_000))
    affinity.follow(["a"])
    prompts = [f"prefix {i:03d} " + "y" * 490 for i in range(100)]  # 50,000 characters in all
    for prompt in prompts:
        affinity.record(prompt, "a")
        assert affinity.recorded_chars("a") <= 10_000
    matched, owners = affinity.tree.prefix_match(prompts[-1], ["a"])
    assert matched == prompts[-1] and owners == ["a"]  # the newest is kept
    assert len(affinity.tree.prefix_match(prompts[0], ["a"])[0]) < 20  # the oldest is gone


def test_least_loaded_policy_has_no_affinity():
    from app.prefix_routing import affinity

    assert affinity(RequestRouterOptions()) is None
    assert isinstance(affinity(RequestRouterOptions(policy="prefix_aware")), PrefixAffinity)


def test_shared_prefix_count_matches_ray_llms_definition():
    import os
    import random

    from app.prefix_routing import _Tree

    rng = random.Random(0)
    for _ in range(2000):
        a, b = ("".join(rng.choices("ab", k=rng.randint(0, 12))) for _ in range(2))
        assert _Tree._shared_prefix_count(a, b) == len(os.path.commonprefix([a, b])), (a, b)
