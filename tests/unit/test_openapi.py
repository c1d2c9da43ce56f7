"""The OpenAPI document is valid OpenAPI 3.1, names every route the REST adapters answer, and
describes every error with the one ``{"error": ...}`` body."""

from __future__ import annotations

import re

import orjson
from openapi_spec_validator import validate

from inferd.errors import ErrorCode
from inferd.protocols import openapi


def test_the_document_is_valid_openapi() -> None:
    validate(openapi.document())


def test_the_served_bytes_are_the_document() -> None:
    assert orjson.loads(openapi.document_bytes()) == openapi.document()


def test_every_rest_route_is_described() -> None:
    paths = set(openapi.document()["paths"])
    for selector in ("", "/versions/{version}", "/labels/{label}"):
        base = "/v1/models/{model_name}" + selector
        assert {base, base + "/metadata"} <= paths
        assert {f"{base}:{verb}" for verb in ("predict", "classify", "regress")} <= paths
    for selector in ("", "/versions/{version}"):
        base = "/v2/models/{model_name}" + selector
        assert {base, base + "/ready", base + "/config", base + "/infer", base + "/stats"} <= paths
    assert {
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/stats",
        "/metrics",
        "/openapi.json",
    } <= paths
    assert {"/v2/repository/index", "/v2/repository/models/{model_name}/load"} <= paths


def test_every_error_status_has_the_error_body() -> None:
    document = openapi.document()
    statuses = {str(code.http_status) for code in ErrorCode} | {"403"}
    assert {name.removeprefix("E") for name in document["components"]["responses"]} == statuses
    for response in document["components"]["responses"].values():
        assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    operation_ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))


def test_links_point_at_operations_that_exist() -> None:
    document = openapi.document()
    operations = {op["operationId"]: op for item in document["paths"].values() for op in item.values()}
    links = [link for op in operations.values() for link in op["responses"]["200"].get("links", {}).values()]
    assert links
    for link in links:
        target = operations[link["operationId"]]
        declared = {p["$ref"].rsplit("/", 1)[-1] for p in target.get("parameters", []) if "$ref" in p}
        assert set(link["parameters"]) <= declared
        assert all(re.fullmatch(r"\$(request|response)\..+", value) for value in link["parameters"].values())
