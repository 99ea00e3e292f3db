"""The Helm chart, offline: it renders (default values and overrides) and lints clean with Helm's own engine
(helm-python-sdk), every RayService validates against KubeRay's CRD made strict, the Serve config parses with Ray's
own schema and its import path imports, and the cluster YAML loads as moeserve's ClusterConfig."""
import copy
import importlib
import subprocess
import sys

import jsonschema
import pytest
import yaml

from moeserve.cluster.config import ClusterConfig
from moeserve.kernels.errors import ConfigError
from tests.helm.chart import CHART, ROOT, render, validate

pytest.importorskip("helm_python")

OVERRIDES = {
    "default": {},
    "hostPath and a copy": {"model": {"path": "/local/ckpt", "volume": {"kind": "hostPath", "hostPath": "/mnt/ssd",
                                                                          "mountPath": "/local", "readOnly": False},
                                      "copyFrom": {"path": "exports/DeepSeek-V3",
                                                   "volume": {"nfs": {"server": "nfs.local", "path": "/models"}}}}},
    "no autoscaler, no auth": {"autoscaler": {"enabled": False}, "auth": {"enabled": False},
                               "upgradeStrategy": {"type": "None"}},
    "own secret, pull secrets, selectors": {
        "auth": {"existingSecret": "ray-token"}, "imagePullSecrets": [{"name": "regcred"}],
        "image": {"repository": "registry.local/moeserve", "tag": "2026.11"},
        "experts": {"minReplicas": 2, "maxReplicas": 16, "replicas": 2, "gpus": 8,
                    "nodeSelector": {"gpu": "h200"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "attention": {"gpus": 0}, "serve": {"serviceType": "LoadBalancer", "httpPort": 8080, "grpcPort": 50051},
        "model": {"name": "deepseek-v3"}},
    "another cluster": {"cluster": {"dtype": "float32", "expert_groups": 4, "redundant_experts": 4,
                                    "topology": "cpu-local", "transport": "ray", "mtp": True,
                                    "engine": {"micro_batches": 2}}},
}


@pytest.fixture(scope="module", params=list(OVERRIDES))
def rendered(request):
    return request.param, render(OVERRIDES[request.param])


def rayservice(docs: dict) -> dict:
    return docs["rayservice.yaml"][0]


def test_the_chart_lints_clean():
    import helm_python
    result = helm_python.lint(str(CHART), strict=True)
    assert result["errors"] == [] and result["messages"] == []


def test_every_rendering_is_a_valid_rayservice(rendered):
    _, docs = rendered
    assert sorted(docs) == ["NOTES.txt", "configmap.yaml", "rayservice.yaml"]
    validate(rayservice(docs))


def test_a_misspelled_key_is_caught_by_the_strict_crd_and_by_the_values_schema():
    service = rayservice(render({}))
    wrong = copy.deepcopy(service)
    wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["maxReplica"] = 4  # maxReplicas
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate(wrong)
    wrong = copy.deepcopy(service)
    wrong["spec"]["rayClusterConfig"]["autoscalerOptions"]["idleTimeoutSecond"] = 60
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong)
    import helm_python
    for values in ({"experts": {"maxReplica": 3}}, {"cluster": {"dtyp": "float32"}},
                   {"cluster": {"engine": {"block_sise": 16}}}, {"serve": {"httpPort": "eighty"}},
                   {"cluster": {"dispatch_dtype": "int4"}}, {"autoscaler": {"upscalingMode": "Fast"}}):
        with pytest.raises(helm_python.HelmValuesError):
            render(values)


def test_the_serve_config_parses_with_rays_schema_and_imports(rendered):
    from ray.serve.schema import ServeDeploySchema
    name, docs = rendered
    spec = rayservice(docs)["spec"]
    serve = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    app = serve.applications[0]
    module, attribute = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    servicer = serve.grpc_options.grpc_servicer_functions[0].rsplit(".", 1)
    assert callable(getattr(importlib.import_module(servicer[0]), servicer[1]))
    ports = {p["name"]: p["port"] for p in spec["serveService"]["spec"]["ports"]}
    assert ports == {"serve": serve.http_options.port, "serve-grpc": serve.grpc_options.port}
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["serve-grpc"] == serve.grpc_options.port
    assert app.args["config"] == "/etc/moeserve/cluster.yaml"


def test_the_cluster_yaml_loads_as_cluster_config(rendered, tmp_path):
    name, docs = rendered
    path = tmp_path / "cluster.yaml"
    path.write_text(docs["configmap.yaml"][0]["data"]["cluster.yaml"])
    config = ClusterConfig.from_yaml(path)
    values = OVERRIDES[name]
    assert config.placement == "resources" and config.ray.address == "auto"
    assert config.model == values.get("model", {}).get("path", "/models/DeepSeek-V3")
    for key, value in values.get("cluster", {}).items():
        assert getattr(config, key) == value if key != "engine" else config.engine.micro_batches == 2


def test_worker_groups_offer_moeserve_resources_and_gpus(rendered):
    name, docs = rendered
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    experts, attention = groups["experts"], groups["attention"]
    assert experts["resources"] == {"moeserve-expert": "8"} and attention["resources"] == {"moeserve-attention": "2"}
    values = OVERRIDES[name]
    assert experts["maxReplicas"] == values.get("experts", {}).get("maxReplicas", 4)
    container = experts["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == experts["rayStartParams"]["num-gpus"] == "8"
    gpus = values.get("attention", {}).get("gpus", 2)
    assert attention["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") == \
        (str(gpus) if gpus else None)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    if values.get("autoscaler", {}).get("enabled", True):
        assert cluster["enableInTreeAutoscaling"] is True
        assert cluster["autoscalerOptions"]["version"] == "v2"
        assert all("RAY_enable_autoscaler_v2" not in str(g) for g in (cluster, ))  # v2 by the field, not the env
    else:
        assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    auth = values.get("auth", {})
    if auth.get("enabled", True):
        assert cluster["authOptions"]["mode"] == "token"
        assert cluster["authOptions"].get("secretName") == (auth.get("existingSecret") or None)
    else:
        assert "authOptions" not in cluster


def test_a_copy_from_a_mounted_source_runs_before_ray(rendered):
    name, docs = rendered
    for pod in pods(rayservice(docs)):
        init = pod.get("initContainers", [])
        if name == "hostPath and a copy":
            assert [c["name"] for c in init] == ["copy-model"]
            assert "/model-source/exports/DeepSeek-V3/." in init[0]["args"][0]
            assert {v["name"] for v in pod["volumes"]} == {"model", "cluster-config", "model-source"}
            assert next(v for v in pod["volumes"] if v["name"] == "model")["hostPath"]["path"] == "/mnt/ssd"
        else:
            assert init == []
            assert next(v for v in pod["volumes"] if v["name"] == "model")["persistentVolumeClaim"]


def pods(service: dict) -> list[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in
                                                             cluster["workerGroupSpecs"]]


def test_names_fit_kuberays_limit_and_notes_say_how_to_reach_both_protocols():
    long = "a-release-name-that-goes-on-and-on-well-past-the-limit"
    docs = render({}, name=long)
    name = rayservice(docs)["metadata"]["name"]
    assert len(name) <= 47 and long.startswith(name)
    validate(rayservice(docs))
    notes = docs["NOTES.txt"]
    assert f"{name}-serve:8000" in notes and f"{name}-serve:9000" in notes and "grpcurl" in notes
    assert rayservice(render({}, name="moeserve"))["metadata"]["name"] == "moeserve"


@pytest.mark.parametrize("tool", ["helm_schema.py", "helm_docs.py"])
def test_the_schema_and_the_values_reference_are_generated(tool):
    """values.schema.json from ClusterConfig, README's values reference from values.yaml's comments: neither
    drifts from its source."""
    out = subprocess.run([sys.executable, f"tools/{tool}", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_serve_application_needs_its_config():
    from moeserve.actors.serve import build_app
    with pytest.raises(ConfigError, match="no cluster config"):
        build_app({})
    with pytest.raises(ConfigError, match="no such cluster config"):
        build_app({"config": "/nonexistent/cluster.yaml"})
