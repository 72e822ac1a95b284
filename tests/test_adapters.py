"""Unit tests for the LoRA adapter lookups (`app.adapters`): which base model, which names are free."""

from __future__ import annotations

import pytest

from app.adapters import Adapter, AdapterTable, listed_adapters, lora_base
from app.config import AppConfig
from app.errors import APIError


def app_config(*models: dict) -> AppConfig:
    return AppConfig.model_validate({"models": list(models)})


CHAT = {"name": "chat", "source": "org/chat", "lora_adapters": {"sql": "adapters/sql"}}
OTHER = {"name": "other", "source": "org/other", "engine_args": {"enable_lora": True}}
PLAIN = {"name": "plain", "source": "org/plain"}


def error_of(fn, *args) -> APIError:
    with pytest.raises(APIError) as error:
        fn(*args)
    return error.value


def test_the_only_lora_model_is_the_default_base():
    assert lora_base(app_config(CHAT, PLAIN), None).name == "chat"


def test_a_named_base_is_taken():
    assert lora_base(app_config(CHAT, OTHER), "other").name == "other"


def test_several_lora_models_need_a_name():
    error = error_of(lora_base, app_config(CHAT, OTHER), None)
    assert error.status == 400 and error.param == "model"
    assert "'chat'" in error.message and "'other'" in error.message


def test_no_lora_model_says_so():
    error = error_of(lora_base, app_config(PLAIN), None)
    assert error.status == 400 and "no model of this app has LoRA enabled" in error.message


def test_a_model_without_lora_is_a_clear_400():
    error = error_of(lora_base, app_config(CHAT, PLAIN), "plain")
    assert error.status == 400 and error.param == "model"
    assert "`plain` does not serve LoRA adapters" in error.message and "enable_lora" in error.message
    assert "['chat']" in error.message


def test_an_unknown_base_is_404():
    assert error_of(lora_base, app_config(CHAT), "nope").status == 404
    assert error_of(lora_base, app_config(CHAT), 3).status == 400


def test_listed_and_loaded_adapters_map_to_their_base():
    config = app_config(CHAT, OTHER)
    assert listed_adapters(config) == {"sql": Adapter("sql", "chat", "adapters/sql", True)}
    table = AdapterTable(config, {"chat": "chat", "other": "other"}, "llm")
    table.loaded = {"math": Adapter("math", "other", "/m", False)}
    assert table.bases() == {"sql": "chat", "math": "other"}
    assert table.get("math").path == "/m" and table.get("nope") is None


@pytest.mark.parametrize("name, base, problem", [
    ("chat", "other", "conflicts with a served base model"),
    ("sql", "chat", "listed in the app's config"),
    ("math", "chat", "loaded on the model `other`"),
])
def test_names_a_runtime_load_may_not_take(name, base, problem):
    config = app_config(CHAT, OTHER)
    table = AdapterTable(config, {"chat": "chat", "other": "other"}, "llm")
    table.loaded = {"math": Adapter("math", "other", "/m", False)}
    error = error_of(table.check_new, name, config.model(base))
    assert error.status == 400 and problem in error.message


def test_a_reload_on_the_same_base_is_vllms_to_judge():
    config = app_config(CHAT, OTHER)
    table = AdapterTable(config, {"chat": "chat", "other": "other"}, "llm")
    table.loaded = {"math": Adapter("math", "other", "/m", False)}
    table.check_new("math", config.model("other"))  # vLLM answers (already loaded, or load_inplace)
    table.check_new("new", config.model("chat"))
