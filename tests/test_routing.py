"""Unit tests for request routing, body parsing and API keys (`app.routing`, `app.errors`)."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from app.config import AppConfig
from app.errors import APIError, bad_request, unauthorized
from app.routing import (
    ServedRoutes,
    parse_json_object,
    require_api_key,
    route_request,
    spill_target,
    with_model,
)

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"


@pytest.fixture(scope="module")
def config() -> AppConfig:
    return AppConfig.model_validate(
        {
            "models": [
                {"name": "chat-a", "source": "org/a"},
                {"name": "chat-b", "source": "org/b", "task": "generate"},
                {"name": "embedder", "source": "org/e", "task": "embed"},
            ]
        }
    )


@pytest.fixture(scope="module")
def single() -> AppConfig:
    return AppConfig.model_validate({"models": [{"name": "only", "source": "org/only"}]})


# What vLLM 0.32's app registers for each task (engine replicas publish these).
GENERATE_ROUTES = ServedRoutes(["/tokenize", "/detokenize", CHAT, "/v1/completions", "/v1/responses",
                                "/v1/responses/{response_id}/cancel"])
EMBED_ROUTES = ServedRoutes(["/tokenize", "/detokenize", EMBED, "/pooling", "/v1/score", "/rerank"])


@pytest.fixture(scope="module")
def served() -> dict[str, ServedRoutes]:
    return {"chat-a": GENERATE_ROUTES, "chat-b": GENERATE_ROUTES, "embedder": EMBED_ROUTES, "only": GENERATE_ROUTES}


def api_error(fn, *args) -> APIError:
    with pytest.raises(APIError) as error:
        fn(*args)
    return error.value


def assert_openai_body(error: APIError, status: int, type_: str, param: str | None):
    body = error.body()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status and error.status == status
    assert body["error"]["type"] == type_
    assert body["error"]["param"] == param
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    response = error.response()
    assert response.status_code == status
    assert json.loads(response.body) == json.loads(json.dumps(body))
    return body["error"]["message"]


# --- route_request ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, model",
    [(CHAT, "chat-a"), ("/v1/completions", "chat-b"), (EMBED, "embedder"), ("/tokenize", "embedder"),
     ("/detokenize", "chat-a")],
)
def test_valid_routing(config, served, route, model):
    routed = route_request(config, route, {"model": model, "messages": []}, served)
    assert routed.model is config.model(model)
    assert routed.stream is False


def test_unknown_model_is_404_with_openai_body(config, served):
    error = api_error(route_request, config, CHAT, {"model": "gpt-4"}, served)
    message = assert_openai_body(error, 404, "NotFoundError", "model")
    assert "gpt-4" in message
    for name in ("chat-a", "chat-b", "embedder"):
        assert name in message  # says what exists


def test_missing_model_with_one_candidate(config, single, served):
    assert route_request(config, EMBED, {"input": "hi"}, served).model.name == "embedder"
    assert route_request(single, CHAT, {"messages": []}, served).model.name == "only"
    assert route_request(config, EMBED, {"model": None, "input": "hi"}, served).model.name == "embedder"


def test_missing_model_with_several_candidates_is_400(config, served):
    error = api_error(route_request, config, CHAT, {"messages": []}, served)
    message = assert_openai_body(error, 400, "BadRequestError", "model")
    assert "required" in message and "chat-a" in message and "chat-b" in message
    assert "embedder" not in message  # only the models able to serve the route


def test_missing_model_with_no_candidate_is_404(single, served):
    error = api_error(route_request, single, EMBED, {"input": "x"}, served)
    assert_openai_body(error, 404, "NotFoundError", None)


@pytest.mark.parametrize("model", [1, ["chat-a"], {"name": "chat-a"}, True])
def test_non_string_model_is_400(config, served, model):
    error = api_error(route_request, config, CHAT, {"model": model}, served)
    message = assert_openai_body(error, 400, "BadRequestError", "model")
    assert "string" in message


def test_embed_model_on_chat_route_is_400(config, served):
    error = api_error(route_request, config, CHAT, {"model": "embedder", "messages": []}, served)
    message = assert_openai_body(error, 400, "BadRequestError", "model")
    assert "embedder" in message and CHAT in message and "embed" in message


def test_generate_model_on_embeddings_route_is_400(config, served):
    error = api_error(route_request, config, EMBED, {"model": "chat-a", "input": "x"}, served)
    assert_openai_body(error, 400, "BadRequestError", "model")


@pytest.mark.parametrize("stream, expected", [(True, True), (False, False), (None, False)])
def test_stream_flag(config, served, stream, expected):
    assert route_request(config, CHAT, {"model": "chat-a", "stream": stream}, served).stream is expected


@pytest.mark.parametrize("stream", ["true", 1, 0, [], {"x": 1}])
def test_stream_must_be_boolean(config, served, stream):
    error = api_error(route_request, config, CHAT, {"model": "chat-a", "stream": stream}, served)
    message = assert_openai_body(error, 400, "BadRequestError", "stream")
    assert "boolean" in message


def test_routes_come_from_the_engines_with_path_parameters():
    assert "/v1/responses/resp_123/cancel" in GENERATE_ROUTES
    assert "/v1/responses/a/b/cancel" not in GENERATE_ROUTES
    assert "/v1/responsesX" not in GENERATE_ROUTES and EMBED not in GENERATE_ROUTES


def test_a_route_no_model_serves_is_404(config, served):
    error = api_error(route_request, config, "/v1/audio/transcriptions", {"model": "chat-a"}, served)
    assert_openai_body(error, 404, "NotFoundError", None)


def test_a_route_only_some_models_serve_names_them(config, served):
    error = api_error(route_request, config, "/v1/score", {"model": "chat-b"}, served)
    message = assert_openai_body(error, 400, "BadRequestError", "model")
    assert "embedder" in message and "chat-a" not in message


def test_a_model_still_starting_is_routed_by_name(config, served):
    starting = {k: v for k, v in served.items() if k != "chat-a"}
    assert route_request(config, "/v1/responses", {"model": "chat-a"}, starting).model.name == "chat-a"


# --- parse_json_object ---------------------------------------------------------------------------


def test_parse_json_object_valid():
    body = '{"model": "chat-a", "messages": [{"role": "user", "content": "héllo"}]}'.encode()
    assert parse_json_object(body) == {"model": "chat-a", "messages": [{"role": "user", "content": "héllo"}]}


@pytest.mark.parametrize(
    "body", [b"", b"{", b'{"model": }', b"not json", b'{"a": 1} trailing', b'{"model": "\xff"}', b"\xff\xfe{"]
)
def test_parse_json_object_malformed_is_400(body):
    error = api_error(parse_json_object, body)
    message = assert_openai_body(error, 400, "BadRequestError", None)
    assert "not valid JSON" in message


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"null", b"42", b"true"])
def test_parse_json_object_non_object_is_400(body):
    error = api_error(parse_json_object, body)
    message = assert_openai_body(error, 400, "BadRequestError", None)
    assert "JSON object" in message


def test_parse_json_object_deeply_nested_is_400():
    body = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    error = api_error(parse_json_object, body)
    assert error.status == 400


# --- require_api_key -----------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "", "Bearer whatever", "garbage"])
def test_no_keys_means_no_auth(authorization):
    require_api_key(authorization, [])


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic k1", "k1", "Token k1", "Bearer wrong", "Bearer k", "Bearer k1x",
     "Bearer café"],
)
def test_bad_authorization_is_401(authorization):
    error = api_error(require_api_key, authorization, ["k1", "k2"])
    message = assert_openai_body(error, 401, "AuthenticationError", None)
    assert "Bearer" in message
    assert error.headers == {"WWW-Authenticate": "Bearer"}
    assert error.response().headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("authorization", ["Bearer k2", "Bearer k1", "bearer k2", "BEARER k1", "Bearer  k2 "])
def test_right_key_passes(authorization):
    require_api_key(authorization, ["k1", "k2", "k3"])


# --- errors --------------------------------------------------------------------------------------


def test_sse_error_event():
    event = bad_request("boom").sse_event().decode()
    first, second = event.split("\n\n")[:2]
    assert json.loads(first.removeprefix("data: "))["error"]["message"] == "boom"
    assert second == "data: [DONE]"


@pytest.mark.parametrize("make", [lambda: bad_request("x", param="model"), unauthorized])
def test_api_error_survives_pickle_and_copy(make):
    error = make()
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert clone.body() == error.body() and clone.headers == error.headers


# --- spillover ---------------------------------------------------------------------------------------


def spill_config():
    return AppConfig.model_validate({"models": [
        {"name": "big", "source": "x", "fallback": "small", "fallback_after": 4},
        {"name": "small", "source": "y"},
        {"name": "solo", "source": "z"},
    ]})


def test_spill_target_keeps_a_model_that_is_not_busy():
    config = spill_config()
    assert spill_target(config.model("big"), config, {"big": 3}).name == "big"


def test_spill_target_sends_overflow_to_the_fallback():
    config = spill_config()
    assert spill_target(config.model("big"), config, {"big": 4}).name == "small"


def test_spill_target_never_spills_without_opt_in():
    config = spill_config()
    assert spill_target(config.model("solo"), config, {"solo": 1000}).name == "solo"


def test_spill_target_does_not_move_the_queue_onto_a_busier_fallback():
    config = spill_config()
    assert spill_target(config.model("big"), config, {"big": 4, "small": 8}).name == "big"


def test_with_model_readdresses_the_body():
    assert json.loads(with_model({"model": "big", "prompt": "x"}, "small")) == {"model": "small", "prompt": "x"}


# --- request limits ----------------------------------------------------------------------------------

from app.config import RequestLimits  # noqa: E402
from app.routing import check_limits  # noqa: E402

LIMITS = RequestLimits(max_n=4, max_prompts=3, max_total_tokens=1000)


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        ({"n": 5}, "limits.max_n"),
        ({"prompt": ["a", "b", "c", "d"]}, "limits.max_prompts"),
        ({"input": ["a"] * 4}, "limits.max_prompts"),
        ({"max_tokens": 300, "n": 4}, "limits.max_total_tokens"),
        ({"max_completion_tokens": 400, "prompt": ["a", "b", "c"]}, "limits.max_total_tokens"),
    ],
)
def test_limits_refuse_with_400_naming_the_limit(payload, names):
    with pytest.raises(APIError) as e:
        check_limits(payload, LIMITS)
    assert e.value.status == 400 and names in e.value.message


@pytest.mark.parametrize(
    "payload",
    [{"n": 4}, {"prompt": [1, 2, 3, 4, 5, 6]}, {"prompt": ["a", "b", "c"]}, {"max_tokens": 250, "n": 4},
     {"n": "bad type, left to vLLM"}, {"max_tokens": None}],
)
def test_limits_let_requests_within_them_through(payload):
    check_limits(payload, LIMITS)


# --- LoRA adapters ----------------------------------------------------------------------------------


def test_adapter_name_routes_to_its_base_model(config, served):
    routed = route_request(config, CHAT, {"model": "a-lora", "messages": []}, served, {"a-lora": "chat-b"})
    assert routed.model is config.model("chat-b") and routed.adapter == "a-lora"
    assert route_request(config, CHAT, {"model": "chat-b"}, served, {"a-lora": "chat-b"}).adapter is None


def test_adapter_on_a_route_its_base_lacks_is_400(config, served):
    error = api_error(route_request, config, EMBED, {"model": "a-lora", "input": "x"}, served, {"a-lora": "chat-a"})
    assert_openai_body(error, 400, "BadRequestError", "model")


def test_unknown_name_is_404_and_lists_adapters(config, served):
    error = api_error(route_request, config, CHAT, {"model": "b-lora"}, served, {"a-lora": "chat-a"})
    message = assert_openai_body(error, 404, "NotFoundError", "model")
    assert "b-lora" in message and "a-lora" in message
