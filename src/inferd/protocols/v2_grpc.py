"""The Open Inference Protocol (KServe V2) over gRPC: ``inference.GRPCInferenceService``.

Inputs come in ``raw_input_contents`` (what tritonclient sends: row-major little-endian bytes,
BYTES elements as ``<uint32 length><bytes>``), read with ``np.frombuffer``, or in the typed
``contents`` fields, or both: the raw entries then belong to the inputs without contents.
Outputs always go in ``raw_output_contents``, the only place tritonclient reads numeric outputs
from.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format

import inferd
from inferd._proto import grpc_service_pb2 as pb
from inferd._proto import grpc_service_pb2_grpc as pb_grpc
from inferd.control import ModelControl
from inferd.errors import InferdError, InvalidArgument, NotFound, Unavailable
from inferd.protocols.codecs import from_raw, read_values, to_raw
from inferd.protocols.decoding import BodyDecoder, off_loop
from inferd.protocols.grpc_status import (
    Context,
    answer,
    deadline_of,
    message_bytes,
    tell_version,
    traffic_key,
)
from inferd.protocols.limits import RequestLimits
from inferd.protocols.rest_status import model_ref
from inferd.protocols.v2 import (
    V2_EXTENSIONS,
    V2_PLATFORMS,
    refuse_unserved,
    v2_index,
    v2_model_config,
    v2_signature,
)
from inferd.protocols.v2_triton import load_failure, load_parameters, statistics, unknown_model
from inferd.service import Call, InferenceService
from inferd.types import (
    ModelRef,
    Tensors,
    TensorSpec,
    dtype_of,
    integer_range_error,
)

PROTOCOL = "v2_grpc"
_T = TypeVar("_T")
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
ADMIN_METHODS = tuple(
    f"/{SERVICE}/{name}" for name in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
)
"""The model repository extension's RPCs, which need the admin token."""

_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""Datatype -> the InferTensorContents field that holds its values (FP16 has none: raw only)."""
_WIRE_DTYPES = {"int_contents": np.dtype(np.int32), "uint_contents": np.dtype(np.uint32)}
"""The protobuf type of the integer fields that also carry narrower datatypes."""


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Health, metadata, configuration and inference on ``InferenceService``; the repository
    RPCs on ``ModelControl``. The tensors of a large ModelInfer message are decoded on
    ``decode_pool`` (``decoding.off_loop`` of ``message_bytes()``)."""

    def __init__(
        self,
        service: InferenceService,
        control: ModelControl,
        limits: RequestLimits,
        decode_pool: BodyDecoder | None = None,
    ) -> None:
        self._service = service
        self._control = control
        self._limits = limits
        self._decode_pool = decode_pool

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._service.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return await answer(context, self._model_ready(request), self._service.request_id())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="inferd", version=inferd.__version__, extensions=V2_EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        call = self._named(request.name, request.version, self._metadata(request))
        return await answer(context, call, self._service.request_id())

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        call = self._service.call(
            PROTOCOL, request.model_name, traffic_key=traffic_key(context, self._service.traffic_key_header)
        )
        run = self._named(
            request.model_name, request.model_version, self._infer(call, request, deadline_of(context))
        )
        reply = await answer(context, run, call.id)
        tell_version(context, call.answered_by)
        return reply

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        call = self._named(request.name, request.version, self._config(request))
        return await answer(context, call, self._service.request_id())

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        return await answer(context, self._statistics(request), self._service.request_id())

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        return await answer(context, self._index(request), self._service.request_id())

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        return await answer(context, self._load(request), self._service.request_id())

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        call = self._control.unload(request.model_name)  # unload_dependents: inferd has no ensembles
        await answer(context, call, self._service.request_id())
        return pb.RepositoryModelUnloadResponse()

    async def _named(self, name: str, version: str, call: Coroutine[Any, Any, _T]) -> _T:
        """``call``, with a NotFound for an unknown model or version in Triton's words."""
        try:
            return await call
        except NotFound as error:
            raise unknown_model(self._service, name, version, error) from None

    async def _statistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        document = statistics(self._service, request.name, request.version)
        return json_format.ParseDict(document, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def _model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        ref = _ref(request.name, request.version)
        try:
            self._service.metadata(ref)
        except (NotFound, Unavailable):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def _metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        meta = self._service.metadata(_ref(request.name, request.version))
        signature = v2_signature(meta)
        reply = pb.ModelMetadataResponse(
            name=meta.model_id.name,
            versions=[str(v) for v in meta.versions],
            platform=V2_PLATFORMS.get(meta.platform, meta.platform),
        )
        for spec in signature.inputs:
            _fill_metadata(reply.inputs.add(), spec)
        for spec in signature.outputs:
            _fill_metadata(reply.outputs.add(), spec)
        return reply

    async def _config(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        config = v2_model_config(self._service.metadata(_ref(request.name, request.version)))
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    async def _index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        rows = v2_index(self._control.index(request.ready))
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    async def _load(self, request: pb.RepositoryModelLoadRequest) -> pb.RepositoryModelLoadResponse:
        name = request.model_name
        try:
            await self._control.load(name, load_parameters(name, _values(request.parameters)))
        except InferdError as error:
            raise load_failure(name, error) from None
        return pb.RepositoryModelLoadResponse()

    async def _infer(
        self, call: Call, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelInferResponse:
        with call:
            return await self._infer_call(call, request, deadline)

    async def _infer_call(
        self, call: Call, request: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelInferResponse:
        ref = _ref(request.model_name, request.model_version)
        if request.parameters:
            refuse_unserved("the request", _values(request.parameters))
        for tensor in request.inputs:
            if tensor.parameters:
                refuse_unserved(f"input {tensor.name!r}", _values(tensor.parameters))
        for output in request.outputs:
            if output.parameters:
                refuse_unserved(f"output {output.name!r}", _values(output.parameters))
        await call.load(ref)
        outputs = [spec.name for spec in call.open(ref).outputs]
        wanted = [output.name for output in request.outputs] or outputs
        for i, name in enumerate(wanted):
            if name not in outputs:
                raise InvalidArgument(f"unknown output {name!r}; the model has {sorted(outputs)}")
            if name in wanted[:i]:
                raise InvalidArgument(f"output {name!r} is requested twice")
        pool = self._decode_pool
        if off_loop(pool, message_bytes()):
            inputs = await pool.on_thread(decode_inputs, request, self._limits)
        else:
            inputs = decode_inputs(request, self._limits)
        response = await call.infer(inputs, deadline, request.id or None)
        reply = pb.ModelInferResponse(
            model_name=response.model_id.name, model_version=str(response.model_id.version), id=request.id
        )
        for name in wanted:
            value = response.outputs[name]
            reply.outputs.add(name=name, datatype=dtype_of(value.dtype).v2, shape=value.shape)
            reply.raw_output_contents.append(to_raw(value))
        return reply


def _values(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Parameter messages (``InferParameter`` and the like) -> their values (bool, int64, string...)."""
    return {
        key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
        for key, value in parameters.items()
    }


def _ref(name: str, version: str) -> ModelRef:
    if not name:
        raise InvalidArgument("a model name is required")
    if version and not (version.isascii() and version.isdigit()):
        raise InvalidArgument(f"model version must be a number, got {version!r}")
    return model_ref(name, version or None)


def _fill_metadata(tensor: pb.ModelMetadataResponse.TensorMetadata, spec: TensorSpec) -> None:
    tensor.name = spec.name
    tensor.datatype = dtype_of(spec.dtype).v2
    tensor.shape.extend([-1] if spec.shape is None else spec.shape)


def decode_inputs(request: pb.ModelInferRequest, limits: RequestLimits) -> Tensors:
    """The request's input tensors, each from its ``contents`` or from ``raw_input_contents``,
    every shape checked against ``limits`` before its tensor is made. The raw entries belong, in
    order, to the inputs that have no ``contents`` (all of them when none has), as KServe's
    client sends a request that mixes the two.

    Raises:
        InvalidArgument: an unknown datatype, a negative dim, a raw entry count that is not the
            number of inputs without contents, or data that does not fill the shape; the message
            names the input.
        ResourceExhausted: a shape or string over a limit.
    """
    raw = request.raw_input_contents
    typed = [tensor.HasField("contents") for tensor in request.inputs]
    if raw and len(raw) != typed.count(False):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for the {typed.count(False)} inputs without "
            "contents; give one per such input, in the order of 'inputs'"
        )
    tensors: Tensors = {}
    next_raw = 0
    for tensor, has_contents in zip(request.inputs, typed, strict=True):
        name = tensor.name
        if name in tensors:
            raise InvalidArgument(f"input {name!r} is given twice")
        try:
            dtype = dtype_of(tensor.datatype)
        except KeyError:
            dtype = None
        if dtype is None or dtype.v2 != tensor.datatype:
            raise InvalidArgument(f"input {name!r}: unknown datatype {tensor.datatype!r}")
        shape = list(tensor.shape)
        count = limits.elements(name, shape)
        if raw and not has_contents:
            array = from_raw(raw[next_raw], dtype.numpy, count, name, "raw_input_contents", limits)
            next_raw += 1
        else:
            array = _from_contents(tensor, dtype.numpy, count, name, limits)
        tensors[name] = array.reshape(shape)
    return tensors


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor,
    dtype: np.dtype[Any],
    count: int,
    name: str,
    limits: RequestLimits,
) -> np.ndarray:
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise InvalidArgument(f"input {name!r}: {tensor.datatype} data goes in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidArgument(f"input {name!r}: shape needs {count} elements, {field} has {len(values)}")
    if dtype.kind == "O":
        if values:
            limits.string(name, max(map(len, values)))
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array
    # Read in the field's own wire type (int_contents is int32 for INT8 and INT16 too), then
    # range-check the narrowing cast instead of letting numpy wrap or overflow.
    wide = read_values(values, _WIRE_DTYPES.get(field, dtype))
    if (problem := integer_range_error(name, wide, dtype)) is not None:
        raise InvalidArgument(f"{problem} (in {field})")
    return wide.astype(dtype, copy=False)


def add_to_server(
    server: grpc.aio.Server,
    service: InferenceService,
    control: ModelControl,
    limits: RequestLimits,
    decode_pool: BodyDecoder | None = None,
) -> None:
    """Serve GRPCInferenceService on ``server`` (see ``InferenceServicer``)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(service, control, limits, decode_pool), server
    )
