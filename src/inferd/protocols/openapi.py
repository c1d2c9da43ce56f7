"""The OpenAPI 3.1 document of inferd's REST APIs, served at ``GET /openapi.json``.

It describes what the adapters in ``tfserving_rest`` and ``v2_rest`` accept and answer: routes,
request and response bodies, the ``{"error": ...}`` body of every failure and the statuses from
the ``errors`` table. Tensor values are described as loosely as the JSON decoders read them
(any JSON, checked against the model's signature at run time), so the document stays true for
every model. ``tests/e2e/test_fuzz.py`` fuzzes a running server from it with schemathesis.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

import inferd
from inferd.protocols.v2 import V2_DATATYPES, V2_EXTENSIONS
from inferd.types import VersionState

PATH = "/openapi.json"

Schema = dict[str, Any]

_JSON = "application/json"
_BINARY = "application/octet-stream"
_HEADER_LENGTH = "Inference-Header-Content-Length"
_ERROR_CODES = [
    *("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND"),
    *("ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"),
    *("FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL"),
    *("UNAVAILABLE", "DATA_LOSS"),
]
_ERRORS = {
    "400": "Malformed request, one that does not fit the model's signature, or one with more rows than "
    "its model's batching queue holds (INVALID_ARGUMENT)",
    "401": "A bearer token is needed (--api_token) and is missing or wrong",
    "404": "Unknown model, version or route (NOT_FOUND)",
    "413": "Over a size limit: body, headers, tensor elements, string or instances (RESOURCE_EXHAUSTED)",
    "500": "Unexpected failure; the message names the request id and holds no internals",
    "503": "Overloaded, not ready or shutting down; retry after Retry-After seconds",
    "504": "The request took longer than --rest_api_timeout_in_ms",
    "501": "A transfer coding other than chunked (Transfer-Encoding: gzip, chunked): only chunked is "
    "decoded; the connection closes",
}
_ADMIN_ERRORS = {"403": "Admin calls are disabled (no --admin_token), or the API token was used"}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _responses(ok: Schema, admin: bool = False) -> Schema:
    """``ok`` as the 200 response, and the error responses every route can give."""
    errors = {**_ERRORS, **(_ADMIN_ERRORS if admin else {})}
    responses = {"200": ok} | {code: {"$ref": f"#/components/responses/E{code}"} for code in sorted(errors)}
    return responses


def _operation(operation_id: str, summary: str, tag: str, ok: Schema, **extra: Any) -> Schema:
    """One operation: ``ok`` is its 200 response; ``links`` in ``extra`` go on that response."""
    links = extra.pop("links", None)
    if links:
        ok = ok | {"links": links}
    operation: Schema = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    operation["responses"] = _responses(ok, tag == "repository")
    return operation | extra


def _link(operation_id: str, **parameters: str) -> Schema:
    """A link to ``operation_id``, its parameters taken from this request or response."""
    return {"operationId": operation_id, "parameters": parameters}


def _model_params(*names: str) -> list[Schema]:
    return [{"$ref": f"#/components/parameters/{name}"} for name in names]


_TF_SELECTORS = {
    "": ((), "", "the model"),
    "/versions/{version}": (("version",), "Version", "a version"),
    "/labels/{label}": (("label",), "Label", "a labelled version"),
}
"""TF Serving's three ways to name a version in a path: latest, by number, by label; each with
the parameters it adds, its operation id suffix and its words."""

_SAME_MODEL = "$request.path.model_name"


def _tfserving_paths() -> Schema:
    paths: Schema = {}
    for suffix, (extra, id_suffix, which) in _TF_SELECTORS.items():
        base = "/v1/models/{model_name}" + suffix
        params = _model_params("model_name", *extra)
        status_links = {
            "predictOfVersion": _link(
                "tfservingPredictVersion",
                model_name=_SAME_MODEL,
                version="$response.body#/model_version_status/0/version",
            )
        }
        paths[base] = {
            "get": _operation(
                "tfservingStatus" + id_suffix,
                f"Status of {which} (TF Serving GetModelStatus)"
                if extra != ("label",)
                else "Status of every version: TF Serving's GetModelStatus reads no label",
                "tfserving",
                _json(_ref("ModelStatus"), "Versions and their states"),
                parameters=params,
                links=status_links,
            )
        }
        metadata_links = {
            "predictOfVersion": _link(
                "tfservingPredictVersion",
                model_name=_SAME_MODEL,
                version="$response.body#/model_spec/version",
            )
        }
        paths[base + "/metadata"] = {
            "get": _operation(
                "tfservingMetadata" + id_suffix,
                f"Signatures of {which} (TF Serving GetModelMetadata)",
                "tfserving",
                _json(_ref("ModelMetadata"), "The model spec and its signature_def map"),
                parameters=params,
                links=metadata_links,
            )
        }
        for verb, request, response in (
            ("predict", "PredictRequest", "PredictResponse"),
            ("classify", "ExamplesRequest", "ClassifyResponse"),
            ("regress", "ExamplesRequest", "RegressResponse"),
        ):
            paths[f"{base}:{verb}"] = {
                "post": _operation(
                    f"tfserving{verb.capitalize()}{id_suffix}",
                    f"{verb.capitalize()} with {which} (TF Serving REST)",
                    "tfserving",
                    _json(_ref(response), f"The {verb} result"),
                    parameters=params,
                    requestBody={
                        "required": True,
                        "content": {_JSON: {"schema": _ref(request), "examples": _EXAMPLES[verb]}},
                    },
                    links={"status": _link("tfservingStatus", model_name=_SAME_MODEL)},
                )
            }
    return paths


_EXAMPLES: dict[str, Schema] = {
    "predict": {
        "rows": {"value": {"instances": [[1.0, 2.0, 3.0, 4.0]]}},
        "columns": {"value": {"signature_name": "serving_default", "inputs": [[1.0, 2.0, 3.0, 4.0]]}},
    },
    "classify": {"one": {"value": {"examples": [{"x": [1.0, 2.0, 3.0, 4.0]}]}}},
    "regress": {"one": {"value": {"context": {}, "examples": [{"x": [1.0, 2.0, 3.0, 4.0]}]}}},
    "infer": {
        "json": {
            "value": {
                "id": "1",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
                "outputs": [{"name": "y"}],
            }
        }
    },
}
"""Requests for a model with one input ``x``, FP32 [-1, 4], and output ``y``."""


def _v2_paths() -> Schema:
    paths: Schema = {
        "/v2": {
            "get": _operation(
                "v2ServerMetadata", "Server metadata", "v2", _json(_ref("ServerMetadata"), "Name, version")
            )
        },
        "/v2/health/live": {
            "get": _operation("v2Live", "Liveness", "v2", _json(_flag("live"), "The server answers"))
        },
        "/v2/health/ready": {
            "get": _operation(
                "v2Ready", "Readiness", "v2", _json(_flag("ready"), "Every configured model is AVAILABLE")
            )
        },
    }
    for suffix, extra, id_suffix in (("", (), ""), ("/versions/{version}", ("version",), "Version")):
        base = "/v2/models/{model_name}" + suffix
        params = _model_params("model_name", *extra)
        by_name = {"model_name": "$response.body#/name"}
        paths[base] = {
            "get": _operation(
                "v2ModelMetadata" + id_suffix,
                "Model metadata",
                "v2",
                _json(_ref("V2ModelMetadata"), "Inputs and outputs"),
                parameters=params,
                links={
                    "infer": _link("v2Infer", **by_name),
                    "ready": _link("v2ModelReady", **by_name),
                    "config": _link("v2ModelConfig", **by_name),
                    "metadataOfVersion": _link(
                        "v2ModelMetadataVersion", **by_name, version="$response.body#/versions/0"
                    ),
                },
            )
        }
        ready = _object(["name", "ready"], name={"type": "string"}, ready={"type": "boolean"})
        paths[base + "/ready"] = {
            "get": _operation(
                "v2ModelReady" + id_suffix,
                "Model readiness",
                "v2",
                _json(ready, "The version is AVAILABLE"),
                parameters=params,
            )
        }
        paths[base + "/config"] = {
            "get": _operation(
                "v2ModelConfig" + id_suffix,
                "Model configuration (Triton's ModelConfig fields)",
                "v2",
                _json(_ref("ModelConfig"), "What perf_analyzer reads"),
                parameters=params,
            )
        }
        paths[base + "/infer"] = {"post": _infer_operation("v2Infer" + id_suffix, params)}
        paths[base + "/stats"] = {
            "get": _operation(
                "v2ModelStatistics" + id_suffix,
                "Inference statistics of the model's AVAILABLE versions (Triton's statistics extension)",
                "v2",
                _json(_statistics_schema(), "Counts and nanoseconds per version"),
                parameters=params,
            )
        }
    paths["/v2/models/stats"] = {
        "get": _operation(
            "v2Statistics",
            "Inference statistics of every model (Triton's statistics extension)",
            "v2",
            _json(_statistics_schema(), "Counts and nanoseconds per version"),
        )
    }
    paths |= _repository_paths()
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (--enable_metrics)",
            "tags": ["metrics"],
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format 0.0.4",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    paths[PATH] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "tags": ["metrics"],
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
        }
    }
    return paths


def _infer_operation(operation_id: str, params: list[Schema]) -> Schema:
    header_length = {
        "name": _HEADER_LENGTH,
        "in": "header",
        "required": False,
        "description": "Binary tensor data extension: the length of the JSON header that starts the body; "
        "the raw tensor bytes follow it",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
    length = {"type": "string", "pattern": "^[0-9]+$"}
    ok = {
        "description": "Output tensors; with binary outputs (binary tensor data extension), a JSON "
        "header (InferResponse) followed by the raw bytes of each output that has "
        "parameters.binary_data_size",
        "headers": {
            _HEADER_LENGTH: {"description": "With binary outputs: the JSON header's length", "schema": length}
        },
        "content": {
            _JSON: {"schema": _ref("InferResponse")},
            _BINARY: {"schema": {"type": "string", "format": "binary"}},
        },
    }
    return _operation(
        operation_id,
        "Inference (Open Inference Protocol)",
        "v2",
        ok,
        parameters=[*params, header_length],
        requestBody={
            "required": True,
            "content": {
                _JSON: {"schema": _ref("InferRequest"), "examples": _EXAMPLES["infer"]},
                _BINARY: {
                    "schema": {
                        "type": "string",
                        "format": "binary",
                        "description": "Binary tensor data extension: an InferRequest JSON header of "
                        f"{_HEADER_LENGTH} bytes, then the raw little-endian bytes of each input "
                        "with parameters.binary_data_size, in order (BYTES: 4-byte length + bytes)",
                    }
                },
            },
        },
        links={
            "sameVersion": _link(
                "v2InferVersion",
                model_name="$response.body#/model_name",
                version="$response.body#/model_version",
            )
        },
    )


def _statistics_schema() -> Schema:
    duration = _object(["count", "ns"], count={"type": "integer"}, ns={"type": "integer"})
    stages = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    inference = _object(list(stages), **{stage: duration for stage in stages})
    batch = _object(
        ["batch_size", "compute_input", "compute_infer", "compute_output"],
        batch_size={"type": "integer"},
        compute_input=duration,
        compute_infer=duration,
        compute_output=duration,
    )
    version = _object(
        ["name", "version", "last_inference", "inference_count", "execution_count", "inference_stats"],
        name={"type": "string"},
        version={"type": "string"},
        last_inference={"type": "integer", "description": "milliseconds since the epoch; 0: never"},
        inference_count={"type": "integer"},
        execution_count={"type": "integer"},
        inference_stats=inference,
        batch_stats={"type": "array", "items": batch},
    )
    return _object(["model_stats"], model_stats={"type": "array", "items": version})


def _repository_paths() -> Schema:
    index_row = {
        "type": "object",
        "required": ["name", "version", "state"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "state": {"type": "string", "enum": ["LOADING", "READY", "UNLOADING", "UNAVAILABLE"]},
            "reason": {"type": "string"},
        },
    }
    index_request = {"type": "object", "properties": {"ready": {"type": "boolean"}}}
    load_request = {"type": "object", "properties": {"parameters": {"type": "object"}}}
    admin: list[Schema] = [{"bearerAuth": []}]

    def done(key: str) -> Schema:
        return _json(_object(["name", key], name={"type": "string"}, **{key: {"type": "boolean"}}), "Done")

    first = {"model_name": "$response.body#/0/name"}
    paths = {
        "/v2/repository/index": {
            "post": _operation(
                "repositoryIndex",
                "Every configured model's versions and states (admin)",
                "repository",
                _json({"type": "array", "items": index_row}, "The index"),
                security=admin,
                requestBody={"required": False, "content": {_JSON: {"schema": index_request}}},
                links={
                    "load": _link("repositoryLoad", **first),
                    "unload": _link("repositoryUnload", **first),
                    "metadata": _link("v2ModelMetadata", **first),
                },
            )
        }
    }
    by_name = {"model_name": "$response.body#/name"}
    next_steps = {
        "load": {
            "metadata": _link("v2ModelMetadata", **by_name),
            "unload": _link("repositoryUnload", **by_name),
        },
        "unload": {
            "load": _link("repositoryLoad", **by_name),
            "metadata": _link("v2ModelMetadata", **by_name),
        },
    }
    for action in ("load", "unload"):
        paths[f"/v2/repository/models/{{model_name}}/{action}"] = {
            "post": _operation(
                "repository" + action.capitalize(),
                f"{action.capitalize()} a configured model (admin)",
                "repository",
                done(action),
                security=admin,
                parameters=_model_params("model_name"),
                requestBody={"required": False, "content": {_JSON: {"schema": load_request}}},
                links=next_steps[action],
            )
        }
    return paths


def _object(required: list[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": required, "properties": properties}


def _flag(key: str) -> Schema:
    return _object([key], **{key: {"type": "boolean"}})


def _schemas() -> Schema:
    """The request and response bodies."""
    tensor_value = {"description": 'A tensor as nested JSON lists; strings, or {"b64": ...} for bytes'}
    tf_tensor = {
        "type": "object",
        "required": ["dtype", "tensor_shape", "name"],
        "properties": {
            "dtype": {"type": "string", "pattern": "^DT_"},
            "name": {"type": "string"},
            "tensor_shape": {
                "type": "object",
                "required": ["dim", "unknown_rank"],
                "properties": {
                    "dim": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["size", "name"],
                            "properties": {"size": {"type": "string"}, "name": {"type": "string"}},
                        },
                    },
                    "unknown_rank": {"type": "boolean"},
                },
            },
        },
    }
    signature = {
        "type": "object",
        "required": ["inputs", "outputs", "method_name", "defaults"],
        "properties": {
            "inputs": {"type": "object", "additionalProperties": tf_tensor},
            "outputs": {"type": "object", "additionalProperties": tf_tensor},
            "method_name": {"type": "string"},
            "defaults": {"type": "object"},
        },
    }
    v2_tensor_meta = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string", "enum": list(V2_DATATYPES)},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    config_tensor = {
        "type": "object",
        "required": ["name", "data_type", "dims"],
        "properties": {
            "name": {"type": "string"},
            "data_type": {"type": "string", "pattern": "^TYPE_"},
            "dims": {"type": "array", "items": {"type": "integer"}},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "description": "What was wrong and what was expected"}
            },
        },
        "ModelStatus": {
            "type": "object",
            "required": ["model_version_status"],
            "properties": {
                "model_version_status": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["version", "state", "status"],
                        "properties": {
                            "version": {"type": "string", "pattern": "^[0-9]+$"},
                            "state": {"type": "string", "enum": [s.name for s in VersionState]},
                            "status": {
                                "type": "object",
                                "required": ["error_code", "error_message"],
                                "properties": {
                                    "error_code": {"type": "string", "enum": _ERROR_CODES},
                                    "error_message": {"type": "string"},
                                },
                            },
                        },
                    },
                }
            },
        },
        "ModelMetadata": {
            "type": "object",
            "required": ["model_spec", "metadata"],
            "properties": {
                "model_spec": {
                    "type": "object",
                    "required": ["name", "signature_name", "version"],
                    "properties": {
                        "name": {"type": "string"},
                        "signature_name": {"type": "string"},
                        "version": {"type": "string", "pattern": "^[0-9]+$"},
                    },
                },
                "metadata": {
                    "type": "object",
                    "required": ["signature_def"],
                    "properties": {
                        "signature_def": {
                            "type": "object",
                            "required": ["signature_def"],
                            "properties": {
                                "signature_def": {"type": "object", "additionalProperties": signature}
                            },
                        }
                    },
                },
            },
        },
        "PredictRequest": {
            "type": "object",
            "description": "Row format (instances) or columnar format (inputs), exactly one of them",
            "properties": {
                "signature_name": {"type": "string"},
                "instances": {
                    "type": "array",
                    "minItems": 1,
                    "description": "One entry per example: a tensor value, or an object of them by input",
                },
                "inputs": tensor_value
                | {"description": "A tensor value, or an object of them by input name"},
            },
            "oneOf": [{"required": ["instances"]}, {"required": ["inputs"]}],
        },
        "PredictResponse": {
            "type": "object",
            "description": "predictions (row format) or outputs (columnar format)",
            "properties": {"predictions": tensor_value, "outputs": tensor_value},
            "oneOf": [{"required": ["predictions"]}, {"required": ["outputs"]}],
        },
        "ExamplesRequest": {
            "type": "object",
            "required": ["examples"],
            "properties": {
                "signature_name": {"type": "string"},
                "context": {"type": "object", "description": "Features common to every example"},
                "examples": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "description": "Feature name -> value"},
                },
            },
        },
        "ClassifyResponse": {
            "type": "object",
            "required": ["results"],
            "properties": {
                "results": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "array",
                            "prefixItems": [{"type": "string"}, {"type": "number"}],
                            "minItems": 2,
                            "maxItems": 2,
                            "description": "[label, score]",
                        },
                    },
                }
            },
        },
        "RegressResponse": {
            "type": "object",
            "required": ["results"],
            "properties": {"results": {"type": "array", "items": {"type": ["number", "null"]}}},
        },
        "ServerMetadata": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string", "enum": list(V2_EXTENSIONS)}},
            },
        },
        "V2ModelMetadata": {
            "type": "object",
            "required": ["name", "versions", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": v2_tensor_meta},
                "outputs": {"type": "array", "items": v2_tensor_meta},
                "parameters": {"type": "object", "properties": {"device": {"type": "string"}}},
            },
        },
        "ModelConfig": {
            "type": "object",
            "required": ["name", "platform", "backend", "max_batch_size", "input", "output"],
            "properties": {
                "name": {"type": "string"},
                "platform": {"type": "string"},
                "backend": {"type": "string"},
                "max_batch_size": {"type": "integer", "minimum": 0},
                "input": {"type": "array", "items": config_tensor},
                "output": {"type": "array", "items": config_tensor},
                "dynamic_batching": {"type": "object"},
            },
        },
        "InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {
                    "type": "object",
                    "properties": {"binary_data_output": {"type": "boolean"}},
                },
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "shape", "datatype"],
                        "properties": {
                            "name": {"type": "string"},
                            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "datatype": {"type": "string", "enum": list(V2_DATATYPES)},
                            "parameters": {
                                "type": "object",
                                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                            },
                            "data": {
                                "description": "Row-major values, flat or nested; absent when "
                                "parameters.binary_data_size gives them in the binary part"
                            },
                        },
                    },
                },
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "parameters": {
                                "type": "object",
                                "properties": {"binary_data": {"type": "boolean"}},
                            },
                        },
                    },
                },
            },
        },
        "InferResponse": {
            "type": "object",
            "required": ["model_name", "model_version", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "datatype", "shape"],
                        "properties": {
                            "name": {"type": "string"},
                            "datatype": {"type": "string", "enum": list(V2_DATATYPES)},
                            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "data": {"type": "array", "description": "Flat row-major values"},
                            "parameters": {
                                "type": "object",
                                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                            },
                        },
                    },
                },
            },
        },
    }


def _components() -> Schema:
    error_headers = {
        "503": {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait"}},
        "401": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
    }
    responses = {}
    for code, description in {**_ERRORS, **_ADMIN_ERRORS}.items():
        response = _json(_ref("Error"), description)
        if code in error_headers:
            response["headers"] = error_headers[code]
        responses[f"E{code}"] = response
    name = {"type": "string", "minLength": 1}
    return {
        "schemas": _schemas(),
        "responses": responses,
        "parameters": {
            "model_name": {"name": "model_name", "in": "path", "required": True, "schema": name},
            "version": {
                "name": "version",
                "in": "path",
                "required": True,
                "schema": {"type": "integer", "minimum": 0},
            },
            "label": {
                "name": "label",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9_]+$"},
            },
        },
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "description": "--api_token for every call when set; --admin_token for the repository calls",
            }
        },
    }


def document() -> Schema:
    """The OpenAPI document, as a new dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "inferd REST APIs",
            "version": inferd.__version__,
            "description": "TensorFlow Serving's REST API (/v1) and the Open Inference Protocol "
            "(KServe V2, /v2) with Triton's binary tensor data, model repository, model "
            'configuration and statistics extensions. Every error answers {"error": "<message>"}.',
        },
        "security": [{}, {"bearerAuth": []}],
        "tags": [
            {"name": "tfserving", "description": "TensorFlow Serving REST API"},
            {"name": "v2", "description": "Open Inference Protocol"},
            {"name": "repository", "description": "V2 model repository extension; needs --admin_token"},
            {"name": "metrics", "description": "Operations"},
        ],
        "paths": _tfserving_paths() | _v2_paths(),
        "components": _components(),
    }


@functools.cache
def document_bytes() -> bytes:
    """The document as JSON, built once."""
    return orjson.dumps(document())
