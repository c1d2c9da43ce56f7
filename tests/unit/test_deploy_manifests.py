"""The Kubernetes manifests in deploy/ parse, carry the fields their CRDs require (KubeRay's
RayService ray.io/v1, KServe's ServingRuntime v1alpha1 and InferenceService v1beta1), and their
inferd arguments are ones inferd accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.config import gRPCOptions

from inferd.cli import main as cli_main
from inferd.config import ServerConfig
from inferd.errors import ConfigError
from inferd.ray.deployment import PROXY_ENV, app_builder
from inferd.ray.grpc_ingress import SERVICER_FUNCTIONS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _documents(name: str) -> list[dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert documents
    return documents


def _require(obj: dict[str, Any], path: str, kind: type) -> Any:
    """The value at dotted ``path``, failing unless it is there and of ``kind``."""
    value: Any = obj
    for key in path.split("."):
        assert isinstance(value, dict), f"{path}: {key!r} is not under a mapping"
        assert key in value, f"{path}: missing {key!r}"
        value = value[key]
    assert isinstance(value, kind), f"{path}: expected {kind.__name__}, got {type(value).__name__}"
    return value


def _check_pod_template(template: dict[str, Any], where: str) -> None:
    containers = _require(template, "spec.containers", list)
    assert containers, f"{where}: no containers"
    for container in containers:
        _require(container, "name", str)
        _require(container, "image", str)
        for env in container.get("env", []):
            assert set(env) <= {"name", "value", "valueFrom"}, f"{where}: env {env}"
            assert isinstance(env["value"], str), f"{where}: env values must be strings: {env}"


def test_rayservice_has_what_kuberay_requires() -> None:
    (service,) = _documents("rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1"
    assert service["kind"] == "RayService"
    _require(service, "metadata.name", str)
    cluster = _require(service, "spec.rayClusterConfig", dict)
    assert _require(cluster, "rayVersion", str).startswith("2.60")
    head = _require(cluster, "headGroupSpec", dict)
    assert all(isinstance(v, str) for v in _require(head, "rayStartParams", dict).values())
    _check_pod_template(_require(head, "template", dict), "head")
    for group in _require(cluster, "workerGroupSpecs", list):
        _require(group, "groupName", str)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in _require(group, "rayStartParams", dict).values())
        _check_pod_template(_require(group, "template", dict), group["groupName"])
    for where, template in [("head", head["template"])] + [
        (group["groupName"], group["template"]) for group in cluster["workerGroupSpecs"]
    ]:
        for container in template["spec"]["containers"]:  # every node runs with what Serve needs
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            missing = {name: value for name, value in PROXY_ENV.items() if env.get(name) != value}
            assert not missing, f"{where}: {container['name']} lacks {missing}"
    serve_config = yaml.safe_load(_require(service, "spec.serveConfigV2", str))
    (app,) = _require(serve_config, "applications", list)
    assert _require(app, "import_path", str) == "inferd.ray.deployment:app_builder"
    app_builder(_require(app, "args", dict))  # the args are ones inferd accepts
    grpc_options = gRPCOptions(**_require(serve_config, "grpc_options", dict))
    assert grpc_options.grpc_servicer_functions == SERVICER_FUNCTIONS
    assert len(grpc_options.grpc_servicer_func_callable) == len(SERVICER_FUNCTIONS)  # each one imports


def test_app_builder_names_a_bad_argument() -> None:
    with pytest.raises(ConfigError, match="'max_replica'"):
        app_builder({"repository": "/models", "max_replica": 2})
    with pytest.raises(ConfigError, match="'min_replicas' must be int"):
        app_builder({"repository": "/models", "min_replicas": "two"})
    with pytest.raises(ConfigError, match=r"'max_replicas' must be int, got 2\.5"):
        app_builder({"repository": "/models", "max_replicas": 2.5})  # not 2
    with pytest.raises(ConfigError, match="'num_replicas' must be int, got True"):
        app_builder({"repository": "/models", "num_replicas": True})
    with pytest.raises(ConfigError, match="'target_ongoing_requests' must be float, got False"):
        app_builder({"repository": "/models", "target_ongoing_requests": False})


def test_servingruntime_has_what_kserve_requires(capsys: pytest.CaptureFixture[str]) -> None:
    runtime, service = _documents("servingruntime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert runtime["kind"] == "ServingRuntime"
    _require(runtime, "metadata.name", str)
    formats = _require(runtime, "spec.supportedModelFormats", list)
    assert all(isinstance(f["name"], str) and isinstance(f.get("autoSelect", False), bool) for f in formats)
    assert set(_require(runtime, "spec.protocolVersions", list)) <= {"v1", "v2", "grpc-v1", "grpc-v2"}
    (container,) = _require(runtime, "spec.containers", list)
    assert container["name"] == "kserve-container"
    args = [a.replace("{{.Name}}", "digits") for a in _require(container, "args", list)]
    assert args[0] == "serve"
    with pytest.raises(SystemExit) as exited:  # the flags parse: --help after them exits 0
        cli_main([*args, "--help"])
    assert exited.value.code == 0
    ports = {p["containerPort"] for p in container["ports"]}
    assert f"--rest_api_port={ports.pop()}" in args
    assert service["kind"] == "InferenceService"
    model = _require(service, "spec.predictor.model", dict)
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in formats}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert ServerConfig().rest_api_port != 8080  # the runtime must set KServe's port itself
