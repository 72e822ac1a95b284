"""Property-based fuzzing of the OpenAI routes: whatever a client sends, no 5xx and no replica restarts."""

from __future__ import annotations

import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=10), inner, max_size=4), max_leaves=12)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]),
                           "content": st.one_of(st.text(max_size=60), json_values)}),
    max_size=3,
)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny-chat", "all-MiniLM-L6-v2", "nope", ""]) | json_values},
    optional={
        "messages": messages | json_values,
        "prompt": st.text(max_size=60) | st.lists(st.integers(-5, 10_000), max_size=8) | json_values,
        "input": st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=3) | json_values,
        "tokens": st.lists(st.integers(-5, 10_000), max_size=8) | json_values,
        "max_tokens": st.integers(-3, 24) | st.integers(2**31, 2**63) | json_values,
        "temperature": st.floats(-2, 5, allow_nan=False) | json_values,
        "top_p": st.floats(-1, 2, allow_nan=False) | json_values,
        "top_k": st.integers(-5, 50) | json_values,
        "n": st.integers(-1, 6) | json_values,
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | json_values,
        "logprobs": st.booleans() | st.integers(-1, 30) | json_values,
        "seed": st.integers(-(2**63), 2**64) | json_values,
        "stream": st.booleans() | json_values,
        "encoding_format": st.sampled_from(["float", "base64", "hex"]) | json_values,
        "response_format": json_values,
        "logit_bias": json_values,
    },
)


def test_fuzzed_requests_never_get_5xx(base_url, request):
    app = None if os.environ.get("APP_URL") else request.getfixturevalue("cpu_app")
    engine_pids = (lambda: app.descendant_pids("ServeReplica:llm:")) if app else set
    before = engine_pids()
    failures = []

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(route=st.sampled_from(ROUTES), body=bodies)
    def check(route, body):
        r = httpx.post(f"{base_url}{route}", json=body, timeout=120)
        if r.status_code >= 500:
            failures.append((route, body, r.status_code, r.text[:300]))
        assert r.status_code < 500, (route, body, r.text[:300])

    check()
    assert not failures
    assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200
    assert engine_pids() == before, "a replica restarted during the fuzz run"
