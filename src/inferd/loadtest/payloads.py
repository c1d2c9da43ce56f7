"""What ``inferd bench`` sends: the request, encoded once, for each protocol it speaks.

Tensors come from a file (``.npy`` for a one-input model, ``.npz`` for several) or are generated
from the model's metadata (``--instances`` rows, free dimensions other than the batch set to 1,
fixed-seed values). A ``.json`` payload file is sent as it is, to the REST protocols only.
String (BYTES / DT_STRING) tensors travel as each protocol carries them: JSON strings (TF
Serving's ``{"b64": ...}`` for bytes that are not UTF-8), length-prefixed raw bytes in V2 binary
and ``raw_input_contents``, ``string_val`` in TF Serving's gRPC.
An ``https://`` URL, or ``ClientTls`` given, speaks TLS, mutual when it holds a certificate.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import numpy as np

from inferd.protocols.codecs import to_raw
from inferd.types import dtype_of

if TYPE_CHECKING:
    import grpc

_T = TypeVar("_T")

PROTOCOLS = ("rest", "v2", "v2-binary", "grpc", "v2-grpc")
"""TF Serving REST, V2 REST JSON, V2 REST binary tensors, TF Serving gRPC, KServe V2 gRPC."""

TF_PREDICT = "/tensorflow.serving.PredictionService/Predict"
V2_INFER = "/inference.GRPCInferenceService/ModelInfer"

Specs = list[tuple[str, str, list[int]]]
"""Input name, V2 datatype and shape (-1 for free dimensions)."""


@dataclass(frozen=True, slots=True)
class ClientTls:
    """TLS towards the server: the CA to trust (empty: the system's) and, for mutual TLS, the
    client's certificate and key, all PEM file paths (paths, so that it crosses to the load
    generator's processes)."""

    ca: str = ""
    cert: str = ""
    key: str = ""

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca or None)
        if self.cert:
            context.load_cert_chain(self.cert, self.key or None)
        return context

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        import grpc

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


@dataclass(frozen=True, slots=True)
class Payload:
    """One encoded request and where it goes.

    For HTTP, ``request`` is the whole HTTP/1.1 request (request line, headers, body); for gRPC
    the serialized request message and ``path`` the method, sent with ``grpc_metadata``.
    """

    protocol: str
    host: str
    port: int
    path: str
    request: bytes
    instances: int
    tls: ClientTls | None = None
    grpc_metadata: tuple[tuple[str, str], ...] = ()

    @property
    def is_grpc(self) -> bool:
        return self.protocol.endswith("grpc")


def build(
    url: str,
    protocol: str,
    model: str,
    *,
    version: int | None = None,
    instances: int = 1,
    payload: Path | None = None,
    metadata_url: str | None = None,
    path: str | None = None,
    tls: ClientTls | None = None,
    api_token: str = "",
) -> Payload:
    """Encode the request for ``protocol``; a REST ``url``'s path (a proxy's prefix, say) goes
    before the protocol's routes, as for the metadata, and ``path`` replaces the whole route (for
    servers with routes of their own, given a ``.json`` body). ``tls`` (implied by an ``https://`` URL) is
    used for the metadata and travels with the payload to the load, as does ``api_token`` (the
    server's ``--api_token``: a bearer token in every request, metadata included).

    Raises:
        ValueError: an unknown protocol, a payload file that does not fit it, or metadata that
            cannot be read (the message says which).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    parts = urlsplit(url if "//" in url else f"//{url}")
    auth = Auth(api_token)
    if tls is None and parts.scheme == "https":
        tls = ClientTls()
    host, port = (
        parts.hostname or "127.0.0.1",
        parts.port or (8500 if protocol in ("grpc", "v2-grpc") else 443 if tls else 80),
    )
    if payload is not None and payload.suffix == ".json":
        if protocol not in ("rest", "v2"):
            raise ValueError(f"a .json payload is a REST body; {protocol} needs .npy or .npz")
        body = _read(payload, payload.read_bytes)
        return _http(
            protocol,
            host,
            port,
            path or parts.path.rstrip("/") + _route(protocol, model, version),
            body,
            _json_rows(body, instances),
            auth.headers,
            tls,
        )
    if payload is not None:
        loaded = _read(payload, lambda: np.load(payload))
        tensors = _read(payload, lambda: dict(loaded)) if isinstance(loaded, np.lib.npyio.NpzFile) else None
        if tensors is None:
            (name, _, _), *_ = _metadata(protocol, url, metadata_url, model, version, tls, auth)
            tensors = {name: np.asarray(loaded)}
    else:
        specs = _metadata(protocol, url, metadata_url, model, version, tls, auth)
        tensors = generate(specs, instances)
    rows = len(next(iter(tensors.values())))
    if protocol == "grpc":
        request = _tf_predict(model, version, tensors)
        return Payload(protocol, host, port, TF_PREDICT, request, rows, tls, auth.grpc_metadata)
    if protocol == "v2-grpc":
        request = _v2_infer(model, version, tensors)
        return Payload(protocol, host, port, V2_INFER, request, rows, tls, auth.grpc_metadata)
    route = path or parts.path.rstrip("/") + _route(protocol, model, version)
    if protocol == "rest":
        first = next(iter(tensors))
        document: Any = (
            {"instances": _json_values(first, tensors[first], protocol)}
            if len(tensors) == 1
            else {"inputs": {k: _json_values(k, v, protocol) for k, v in tensors.items()}}
        )
        return _http(protocol, host, port, route, json.dumps(document).encode(), rows, auth.headers, tls)
    if protocol == "v2":
        inputs = [
            _v2_input(k, v) | {"data": _json_values(k, v.reshape(-1), protocol)} for k, v in tensors.items()
        ]
        body = json.dumps({"inputs": inputs}).encode()
        return _http(protocol, host, port, route, body, rows, auth.headers, tls)
    raws = [to_raw(v) for v in tensors.values()]
    header = json.dumps(
        {
            "inputs": [
                _v2_input(k, v) | {"parameters": {"binary_data_size": len(r)}}
                for (k, v), r in zip(tensors.items(), raws, strict=True)
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    extra = {"Inference-Header-Content-Length": str(len(header)), **auth.headers}
    return _http(protocol, host, port, route, header + b"".join(raws), rows, extra, tls)


@dataclass(frozen=True, slots=True)
class Auth:
    """The server's ``--api_token`` as each protocol sends it ("" sends nothing)."""

    token: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _read(payload: Path, read: Callable[[], _T]) -> _T:
    """What ``read`` reads of the ``--payload`` file.

    Raises:
        ValueError: the file cannot be read, or is not what its suffix says; naming it.
    """
    try:
        return read()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"--payload {payload}: {exc}") from None


def generate(specs: Specs, instances: int) -> dict[str, np.ndarray]:
    """Fixed-seed tensors of ``instances`` rows for the given inputs."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name, datatype, shape in specs:
        dims = [instances] + [1 if d < 0 else d for d in shape[1:]]
        dtype = dtype_of(datatype).numpy
        if dtype.kind == "f":
            tensors[name] = rng.random(dims).astype(dtype)
        elif dtype.kind in "iu":
            tensors[name] = rng.integers(0, 10, dims).astype(dtype)
        elif dtype.kind == "b":
            tensors[name] = rng.integers(0, 2, dims).astype(bool)
        else:
            tensors[name] = np.full(dims, b"x", dtype=object)
    return tensors


def _json_values(name: str, value: np.ndarray, protocol: str) -> Any:
    """``value`` as nested JSON lists; strings as JSON strings, bytes that are not UTF-8 as TF
    Serving's ``{"b64": ...}`` (``rest``).

    Raises:
        ValueError: non-UTF-8 bytes for V2 JSON, which carries text only.
    """
    if value.dtype.kind not in "OSU":
        return value.tolist()
    items = [_json_string(name, item, protocol) for item in value.reshape(-1).tolist()]
    strings = np.empty(len(items), dtype=object)
    strings[:] = items
    return strings.reshape(value.shape).tolist()


def _json_string(name: str, item: object, protocol: str) -> object:
    if not isinstance(item, bytes):
        return str(item)
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError:
        if protocol == "rest":
            return {"b64": base64.b64encode(item).decode("ascii")}
        raise ValueError(
            f"input {name!r} holds bytes that are not UTF-8, which V2 JSON cannot carry; "
            "use --protocol v2-binary or v2-grpc"
        ) from None


def _v2_input(name: str, value: np.ndarray) -> dict[str, Any]:
    return {"name": name, "shape": list(value.shape), "datatype": dtype_of(value.dtype).v2}


def _json_rows(body: bytes, default: int) -> int:
    """Predictions in a REST body: its ``instances``, or the first input's first dimension, or
    ``default`` for a body of another shape."""
    document = json.loads(body)
    inputs = document.get("inputs") if isinstance(document, dict) else None
    if isinstance(document, dict) and isinstance(document.get("instances"), list):
        return len(document["instances"])
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict) and inputs[0].get("shape"):
        return int(inputs[0]["shape"][0])
    first = next(iter(inputs.values()), None) if isinstance(inputs, dict) else inputs
    return len(first) if isinstance(first, list) else default


def _route(protocol: str, model: str, version: int | None) -> str:
    suffix = f"/versions/{version}" if version is not None else ""
    return (
        f"/v1/models/{model}{suffix}:predict" if protocol == "rest" else f"/v2/models/{model}{suffix}/infer"
    )


def _http(
    protocol: str,
    host: str,
    port: int,
    path: str,
    body: bytes,
    rows: int,
    extra: dict[str, str],
    tls: ClientTls | None,
) -> Payload:
    kind = "application/octet-stream" if "Inference-Header-Content-Length" in extra else "application/json"
    headers = {"Host": f"{host}:{port}", "Content-Type": kind, "Content-Length": str(len(body)), **extra}
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return Payload(protocol, host, port, path, head.encode() + body, rows, tls)


def _metadata(
    protocol: str,
    url: str,
    metadata_url: str | None,
    model: str,
    version: int | None,
    tls: ClientTls | None,
    auth: Auth,
) -> Specs:
    """The inputs, from ``metadata_url`` over REST in the protocol's family (TF Serving's or V2's)
    when given, else from the server under load in the protocol itself."""
    if metadata_url:
        family = "rest" if protocol in ("rest", "grpc") else "v2"
        return _specs(family, metadata_url, model, version, tls, auth)
    return _specs(protocol, url, model, version, tls, auth)


def _specs(
    protocol: str, url: str, model: str, version: int | None, tls: ClientTls | None, auth: Auth
) -> Specs:
    """The default signature's inputs, asked of the server in the protocol's own dialect."""
    suffix = f"/versions/{version}" if version is not None else ""
    try:
        if protocol == "grpc":
            return _tf_grpc_specs(url, model, version, tls, auth)
        if protocol == "v2-grpc":
            return _v2_grpc_specs(url, model, version, tls, auth)
        if protocol == "rest":
            document = _get_json(f"{_base(url, tls)}/v1/models/{model}{suffix}/metadata", tls, auth)
            signature = document["metadata"]["signature_def"]["signature_def"]["serving_default"]
            return [
                (name, dtype_of(spec["dtype"]).v2, [int(d["size"]) for d in spec["tensor_shape"]["dim"]])
                for name, spec in signature["inputs"].items()
            ]
        document = _get_json(f"{_base(url, tls)}/v2/models/{model}{suffix}", tls, auth)
        return [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in document["inputs"]]
    except (OSError, http.client.HTTPException, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot read the metadata of model {model!r} at {url}: {exc}") from exc


def _base(url: str, tls: ClientTls | None) -> str:
    return url.rstrip("/") if "//" in url else f"{'https' if tls else 'http'}://{url.rstrip('/')}"


def _get_json(url: str, tls: ClientTls | None, auth: Auth) -> Any:
    context = tls.ssl_context() if tls else None
    request = urllib.request.Request(url, headers=auth.headers)
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return json.loads(response.read())


def _channel(target: str, tls: ClientTls | None) -> grpc.Channel:
    """A blocking gRPC channel to ``target``, over TLS when ``tls`` is given."""
    import grpc

    return grpc.secure_channel(target, tls.grpc_credentials()) if tls else grpc.insecure_channel(target)


def _target(url: str) -> str:
    return urlsplit(url if "//" in url else f"//{url}").netloc


def _tf_grpc_specs(url: str, model: str, version: int | None, tls: ClientTls | None, auth: Auth) -> Specs:
    from inferd._proto import prediction_service_pb2 as ps
    from inferd._proto import prediction_service_pb2_grpc as ps_grpc
    from inferd._proto.types_pb2 import DataType

    request = ps.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    with _channel(_target(url), tls) as channel:
        stub = ps_grpc.PredictionServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = _ask(lambda: stub.GetModelMetadata(request, timeout=10, metadata=auth.grpc_metadata))
    signatures = ps.SignatureDefMap()
    reply.metadata["signature_def"].Unpack(signatures)
    inputs = signatures.signature_def["serving_default"].inputs
    return [
        (key, dtype_of(DataType.Name(info.dtype)).v2, [d.size for d in info.tensor_shape.dim])
        for key, info in inputs.items()
    ]


def _v2_grpc_specs(url: str, model: str, version: int | None, tls: ClientTls | None, auth: Auth) -> Specs:
    from inferd._proto import grpc_service_pb2 as pb
    from inferd._proto import grpc_service_pb2_grpc as pb_grpc

    request = pb.ModelMetadataRequest(name=model, version="" if version is None else str(version))
    with _channel(_target(url), tls) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = _ask(lambda: stub.ModelMetadata(request, timeout=10, metadata=auth.grpc_metadata))
    return [(t.name, t.datatype, list(t.shape)) for t in reply.inputs]


def _ask(call: Callable[[], Any]) -> Any:
    """``call()``, a blocking gRPC call; its failure as a ValueError with the status and details."""
    import grpc

    try:
        return call()
    except grpc.RpcError as exc:
        raise ValueError(f"{exc.code().name}: {exc.details()}") from exc


def _tf_predict(model: str, version: int | None, tensors: dict[str, np.ndarray]) -> bytes:
    from inferd._proto import prediction_service_pb2 as ps
    from inferd.protocols.codecs import encode_tensor

    request = ps.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "serving_default"
    if version is not None:
        request.model_spec.version.value = version
    for name, value in tensors.items():
        encode_tensor(request.inputs[name], value)
    return request.SerializeToString()


def _v2_infer(model: str, version: int | None, tensors: dict[str, np.ndarray]) -> bytes:
    from inferd._proto import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, model_version="" if version is None else str(version))
    for name, value in tensors.items():
        request.inputs.add(name=name, datatype=dtype_of(value.dtype).v2, shape=list(value.shape))
        request.raw_input_contents.append(to_raw(value))
    return request.SerializeToString()
