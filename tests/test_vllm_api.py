"""`app.vllm_api`, the one place the app imports vLLM internals: only supported entry points, and what vLLM asks
for is installed."""

from __future__ import annotations

import sys

import pytest

vllm_api = pytest.importorskip("app.vllm_api")  # needs vLLM (the CPU build here)


def test_no_deprecated_vllm_module_is_imported():
    # vLLM 0.32 deprecates `vllm.entrypoints.openai.api_server` (a re-export of `vllm.entrypoints.launchers`).
    assert vllm_api.build_app.__module__.startswith("vllm.entrypoints.launchers")
    assert "vllm.entrypoints.openai.api_server" not in sys.modules


def test_embeddings_use_orjson_as_vllm_asks():
    from vllm.entrypoints.pooling.utils import get_json_response_cls

    assert get_json_response_cls().__name__ == "ORJSONResponse"  # else vLLM logs "please install orjson"
