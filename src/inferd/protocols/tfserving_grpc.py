"""TensorFlow Serving's gRPC API: ``tensorflow.serving.PredictionService`` and ``ModelService``.

Tensors arrive as ``TensorProto``: numeric ``tensor_content`` is read with ``np.frombuffer``
(no loop over elements); the typed fields (``float_val``, ``int_val``, ...) are read as TF Serving
reads them: a single value fills the whole shape, and a tensor without a shape is a scalar.
Predict answers fill the typed fields as TF Serving does by default (clients read
``outputs["y"].float_val``); with ``--enable_serialization_as_tensor_content`` numbers go in
``tensor_content`` instead. Either way ``tf.make_ndarray`` reads them.

Classify and Regress on a signature whose one input is a string tensor fed by something other
than a feature of its name (TensorFlow's ``tf.Example`` parsing signatures) feed it the examples
serialized, context features merged into each, as TF Serving does.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar, cast

import grpc
import numpy as np

from inferd._proto import model_service_pb2 as ms
from inferd._proto import model_service_pb2_grpc as ms_grpc
from inferd._proto import prediction_service_pb2 as ps
from inferd._proto import prediction_service_pb2_grpc as ps_grpc
from inferd._proto.error_codes_pb2 import Code
from inferd._proto.example_pb2 import Example, Feature
from inferd._proto.meta_graph_pb2 import TensorInfo
from inferd.config import models_from_proto
from inferd.control import ModelControl
from inferd.errors import InvalidArgument, Unimplemented, UnknownLabel
from inferd.protocols.codecs import data_type, decode_tensor, encode_tensor, read_values
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
from inferd.protocols.tfserving_rest import classification_rows, regression_values, unknown_label_as_invalid
from inferd.service import Call, InferenceService
from inferd.types import (
    DEFAULT_SIGNATURE,
    InferenceResponse,
    Method,
    ModelId,
    ModelRef,
    Signature,
    Tensors,
    TensorSpec,
)

PROTOCOL = "tfserving_grpc"
SERVICES = (
    ps.DESCRIPTOR.services_by_name["PredictionService"].full_name,
    ms.DESCRIPTOR.services_by_name["ModelService"].full_name,
)
ADMIN_METHODS = (f"/{SERVICES[1]}/HandleReloadConfigRequest",)
"""ModelService calls that need the admin token."""

_FEATURE_DTYPES = {"float_list": np.float32, "int64_list": np.int64, "bytes_list": object}
_TASK_METHODS = {Method.CLASSIFY.value: Method.CLASSIFY, Method.REGRESS.value: Method.REGRESS}


class PredictionServicer(ps_grpc.PredictionServiceServicer):
    """Predict, Classify, Regress, MultiInference and GetModelMetadata on ``InferenceService``.

    Args:
        max_tensor_bytes: the largest tensor that one typed value may fill.
        limits: the request limits every input is checked against before it is decoded.
        tensor_content: answer Predict with numbers in ``tensor_content`` rather than typed fields.
        decode_pool: where a large Predict's tensors (and a large Classify's, Regress's or
            MultiInference's examples) are decoded and its answer written
            (``decoding.off_loop`` of ``message_bytes()`` and of the outputs' bytes); None: on the
            event loop.
    """

    def __init__(
        self,
        service: InferenceService,
        max_tensor_bytes: int,
        limits: RequestLimits,
        tensor_content: bool = False,
        decode_pool: BodyDecoder | None = None,
    ) -> None:
        self._service = service
        self._decode_pool = decode_pool
        self._tensor_content = tensor_content
        self._max_tensor_bytes = max_tensor_bytes
        self._limits = limits

    async def Predict(self, request: ps.PredictRequest, context: Context) -> ps.PredictResponse:
        return await self._serve(request.model_spec.name, context, self._predict, request)

    async def Classify(
        self, request: ps.ClassificationRequest, context: Context
    ) -> ps.ClassificationResponse:
        return await self._serve(request.model_spec.name, context, self._classify, request)

    async def Regress(self, request: ps.RegressionRequest, context: Context) -> ps.RegressionResponse:
        return await self._serve(request.model_spec.name, context, self._regress, request)

    async def MultiInference(
        self, request: ps.MultiInferenceRequest, context: Context
    ) -> ps.MultiInferenceResponse:
        name = request.tasks[0].model_spec.name if request.tasks else ""
        return await self._serve(name, context, self._multi, request)

    async def _serve(
        self,
        name: str,
        context: Context,
        handle: Callable[[Call, _Request, float | None], Coroutine[Any, Any, _Answer]],
        request: _Request,
    ) -> _Answer:
        """One inference RPC on model ``name``: a call with the request's traffic key, run by
        ``handle``, an unknown label answered INVALID_ARGUMENT, the version that answered in the
        trailing metadata."""
        key = traffic_key(context, self._service.traffic_key_header)
        call = self._service.call(PROTOCOL, name, traffic_key=key)
        run = _label_as_invalid(handle(call, request, deadline_of(context)))
        reply = await answer(context, run, call.id)
        tell_version(context, call.answered_by)
        return reply

    async def GetModelMetadata(
        self, request: ps.GetModelMetadataRequest, context: Context
    ) -> ps.GetModelMetadataResponse:
        return await answer(context, _label_as_invalid(self._metadata(request)), self._service.request_id())

    async def _predict(
        self, call: Call, request: ps.PredictRequest, deadline: float | None
    ) -> ps.PredictResponse:
        with call, unknown_label_as_invalid():
            ref = spec_ref(request.model_spec)
            await call.load(ref)
            signature = call.open(ref, request.model_spec.signature_name or None)
            wanted = _output_filter(signature, list(request.output_filter))
            pool, args = self._decode_pool, (request, self._max_tensor_bytes, self._limits)
            # the hop is awaited only off the loop: a coroutine per call costs the small ones ~2 us
            inputs = (
                await pool.on_thread(_inputs, *args) if off_loop(pool, message_bytes()) else _inputs(*args)
            )
            response = await call.infer(inputs, deadline)
            reply = ps.PredictResponse()
            _fill_spec(reply.model_spec, response.model_id, signature.name)
            outputs = {name: response.outputs[name] for name in wanted or response.outputs}
            if off_loop(pool, sum(value.nbytes for value in outputs.values())):
                await pool.on_thread(_encode_outputs, reply, outputs, self._tensor_content)
            else:
                _encode_outputs(reply, outputs, self._tensor_content)
            return reply

    async def _examples(
        self, call: Call, spec: ps.ModelSpec, input_: ps.Input, method: Method, deadline: float | None
    ) -> tuple[InferenceResponse, str, int]:
        """Run the classify or regress signature on examples: the answer, its signature name and
        the number of examples."""
        ref = spec_ref(spec)
        await call.load(ref)
        signature = call.open(ref, spec.signature_name or None, method)
        pool, args = self._decode_pool, (signature, input_, self._limits)
        inputs, count = (
            await pool.on_thread(examples_to_inputs, *args)
            if off_loop(pool, message_bytes())
            else examples_to_inputs(*args)
        )
        response = await call.infer(inputs, deadline)
        return response, signature.name, count

    async def _classify(
        self, call: Call, request: ps.ClassificationRequest, deadline: float | None
    ) -> ps.ClassificationResponse:
        with call, unknown_label_as_invalid():
            response, signature, _ = await self._examples(
                call, request.model_spec, request.input, Method.CLASSIFY, deadline
            )
            reply = ps.ClassificationResponse()
            _fill_spec(reply.model_spec, response.model_id, signature)
            _fill_classifications(reply.result, response)
            return reply

    async def _regress(
        self, call: Call, request: ps.RegressionRequest, deadline: float | None
    ) -> ps.RegressionResponse:
        with call, unknown_label_as_invalid():
            response, signature, count = await self._examples(
                call, request.model_spec, request.input, Method.REGRESS, deadline
            )
            reply = ps.RegressionResponse()
            _fill_spec(reply.model_spec, response.model_id, signature)
            _fill_regressions(reply.result, response, count)
            return reply

    async def _multi(
        self, call: Call, request: ps.MultiInferenceRequest, deadline: float | None
    ) -> ps.MultiInferenceResponse:
        with call, unknown_label_as_invalid():
            return await self._multi_tasks(call, request, deadline)

    async def _multi_tasks(
        self, call: Call, request: ps.MultiInferenceRequest, deadline: float | None
    ) -> ps.MultiInferenceResponse:
        if not request.tasks:
            raise InvalidArgument("MultiInferenceRequest must name at least one task")
        if len({task.model_spec.name for task in request.tasks}) > 1:
            raise InvalidArgument("All tasks must use the same model name")
        # as TF Serving, the model (of the first task's spec) is looked up before the tasks are read:
        # an unknown one is NOT_FOUND whatever their methods
        await call.load(spec_ref(request.tasks[0].model_spec))
        seen: set[str] = set()
        for task in request.tasks:  # every task is checked before any runs, in order, as TF Serving's
            signature = task.model_spec.signature_name or DEFAULT_SIGNATURE
            if signature in seen:  # as TF Serving: each signature runs once
                raise InvalidArgument(f"Duplicate evaluation of signature: {signature}")
            seen.add(signature)
            if task.method_name not in _TASK_METHODS:
                raise Unimplemented(  # TF Serving's code and words (multi_inference.cc)
                    f"Unsupported signature method_name: {task.method_name}; "
                    f"supported: {', '.join(sorted(_TASK_METHODS))}"
                )
        reply = ps.MultiInferenceResponse()
        for task in request.tasks:
            method = _TASK_METHODS[task.method_name]
            response, signature, count = await self._examples(
                call, task.model_spec, request.input, method, deadline
            )
            result = reply.results.add()
            _fill_spec(result.model_spec, response.model_id, signature)
            if method is Method.CLASSIFY:
                _fill_classifications(result.classification_result, response)
            else:
                _fill_regressions(result.regression_result, response, count)
        return reply

    async def _metadata(self, request: ps.GetModelMetadataRequest) -> ps.GetModelMetadataResponse:
        if not request.metadata_field:
            raise InvalidArgument("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise InvalidArgument(f"Metadata field {field} is not supported")
        meta = self._service.metadata(spec_ref(request.model_spec))
        signatures = ps.SignatureDefMap()
        for name, signature in meta.signatures.items():
            definition = signatures.signature_def[name]
            definition.method_name = signature.method.value
            for spec in signature.inputs:
                _fill_tensor_info(definition.inputs[spec.name], spec)
            for spec in signature.outputs:
                _fill_tensor_info(definition.outputs[spec.name], spec)
        reply = ps.GetModelMetadataResponse()
        _fill_spec(reply.model_spec, meta.model_id, "")
        reply.metadata["signature_def"].Pack(signatures)
        return reply


class ModelServicer(ms_grpc.ModelServiceServicer):
    """GetModelStatus, and HandleReloadConfigRequest (an admin call: the token check is in front)."""

    def __init__(self, service: InferenceService, control: ModelControl) -> None:
        self._service = service
        self._control = control

    async def GetModelStatus(
        self, request: ms.GetModelStatusRequest, context: Context
    ) -> ms.GetModelStatusResponse:
        return await answer(context, self._status(request), self._service.request_id())

    async def HandleReloadConfigRequest(
        self, request: ms.ReloadConfigRequest, context: Context
    ) -> ms.ReloadConfigResponse:
        return await answer(context, self._reload(request), self._service.request_id())

    async def _reload(self, request: ms.ReloadConfigRequest) -> ms.ReloadConfigResponse:
        """Serve the request's models; replies once they loaded (as TF Serving does).

        Raises:
            InvalidArgument: the config holds no ``model_config_list`` (an unset one would read
                as no models, and unload every model), in TF Serving's words.
        """
        if request.config.WhichOneof("config") != "model_config_list":
            raise InvalidArgument(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                "Only ModelConfigList is currently supported"
            )
        await self._control.reload_config(models_from_proto(request.config, "HandleReloadConfigRequest"))
        return ms.ReloadConfigResponse()

    async def _status(self, request: ms.GetModelStatusRequest) -> ms.GetModelStatusResponse:
        ref = spec_ref(request.model_spec)
        # as TF Serving's GetModelStatus: a version label is not read, every version is listed
        # (an unknown label too); only a version number narrows the answer
        reply = ms.GetModelStatusResponse()
        for status in self._service.status(ModelRef(ref.name, version=ref.version)):
            entry = reply.model_version_status.add(version=status.version, state=int(status.state))
            known = status.error_code in Code.keys()  # noqa: SIM118 (an enum wrapper, not a dict)
            entry.status.error_code = cast(Code, Code.Value(status.error_code)) if known else Code.UNKNOWN
            entry.status.error_message = status.error_message
        return reply


_Answer = TypeVar("_Answer")
_Request = TypeVar("_Request")


async def _label_as_invalid(call: Coroutine[Any, Any, _Answer]) -> _Answer:
    """TF Serving answers an unknown version label with INVALID_ARGUMENT (the V2 API, NOT_FOUND)."""
    try:
        return await call
    except UnknownLabel as error:
        raise InvalidArgument(error.message) from None


def _encode_outputs(reply: ps.PredictResponse, outputs: Tensors, tensor_content: bool) -> None:
    """Write ``outputs`` into the Predict answer (see ``encode_tensor``): on the decode thread
    when they are large, as a large request's inputs are decoded there."""
    for name, value in outputs.items():
        encode_tensor(reply.outputs[name], value, tensor_content)


def _inputs(request: ps.PredictRequest, max_tensor_bytes: int, limits: RequestLimits) -> Tensors:
    """The Predict request's input tensors (see ``decode_tensor``)."""
    return {
        name: decode_tensor(name, tensor, max_tensor_bytes, limits) for name, tensor in request.inputs.items()
    }


def spec_ref(spec: ps.ModelSpec) -> ModelRef:
    """The model, and version or label, a ``ModelSpec`` names.

    Raises:
        InvalidArgument: no model name.
    """
    if not spec.name:
        raise InvalidArgument("model_spec.name is required")
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return ModelRef(spec.name, version=spec.version.value)
    if choice == "version_label":
        return ModelRef(spec.name, label=spec.version_label)
    return ModelRef(spec.name)


def _fill_spec(spec: ps.ModelSpec, model_id: ModelId, signature: str) -> None:
    spec.name = model_id.name
    spec.version.value = model_id.version
    spec.signature_name = signature


def _output_filter(signature: Signature, wanted: list[str]) -> list[str]:
    names = [spec.name for spec in signature.outputs]
    seen: set[str] = set()
    for alias in wanted:
        if alias not in names:
            raise InvalidArgument(
                f"output tensor alias not found in signature: {alias} "
                f"Outputs expected to be in the set {{{','.join(names)}}}."
            )
        if alias in seen:
            raise InvalidArgument(f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    return wanted


def _fill_tensor_info(info: TensorInfo, spec: TensorSpec) -> None:
    info.name = spec.tensor_name or spec.name
    info.dtype = data_type(spec.dtype)
    if spec.shape is None:
        info.tensor_shape.unknown_rank = True
    for size in spec.shape or ():
        info.tensor_shape.dim.add(size=size)


def examples_to_inputs(signature: Signature, input_: ps.Input, limits: RequestLimits) -> tuple[Tensors, int]:
    """``tf.Example`` features -> the signature's input tensors, and the number of examples.

    Features are matched to inputs by name; with a one-input signature, a one-feature example gives
    that input whatever its name. A feature's values form one row, and a one-value feature of a
    rank-1 input one element.

    Raises:
        InvalidArgument: no examples, features that do not match the inputs, a feature repeated in
            the context, or a feature whose values differ in kind or count between examples.
        ResourceExhausted: more examples than ``limits.max_instances``, a feature's values over
            ``max_tensor_elements`` all examples together, or a string over ``max_string_bytes``.
    """
    kind = input_.WhichOneof("kind")
    context: dict[str, Feature] = {}
    context_bytes = b""
    if kind == "example_list":
        examples: Sequence[Example] = input_.example_list.examples
    elif kind == "example_list_with_context":
        examples = input_.example_list_with_context.examples
        context = dict(input_.example_list_with_context.context.features.feature)
        context_bytes = input_.example_list_with_context.context.SerializeToString()
    else:
        raise InvalidArgument("input must hold example_list or example_list_with_context")
    if not examples:
        raise InvalidArgument("Input is empty: give at least one example")
    limits.instances("examples", len(examples))
    names = signature.input_names()
    if (serialized := _serialized_examples(signature, examples, context, context_bytes, limits)) is not None:
        return {names[0]: serialized}, len(examples)
    columns: dict[str, list[Feature]] = {name: [] for name in names}
    for i, example in enumerate(examples):
        features = dict(example.features.feature)
        if clash := features.keys() & context.keys():
            raise InvalidArgument(f"examples[{i}] repeats context feature(s) {sorted(clash)}")
        features |= context
        if len(names) == 1 and len(features) == 1:
            features = {names[0]: next(iter(features.values()))}
        elif set(features) != set(names):
            raise InvalidArgument(f"examples[{i}] has features {sorted(features)}; expected {names}")
        for name in names:
            columns[name].append(features[name])
    tensors = {spec.name: _feature_column(spec, columns[spec.name], limits) for spec in signature.inputs}
    return tensors, len(examples)


def _serialized_examples(
    signature: Signature,
    examples: Sequence[Example],
    context: dict[str, Feature],
    context_bytes: bytes,
    limits: RequestLimits,
) -> np.ndarray | None:
    """The examples serialized, each after ``context_bytes`` (the serialized context), for a
    signature whose one input is a string tensor not named by the features (a ``tf.Example``
    parser); else None. Each is one string element under ``limits``, and the context repeated in
    them all too. As in TF Serving, which concatenates them so, a feature in both the context
    and an example is the example's."""
    (spec, *others) = signature.inputs
    if others or spec.dtype.kind != "O":
        return None
    if all(set(example.features.feature) | set(context) == {spec.name} for example in examples):
        return None  # the feature feeds the input by name
    limits.repeated_context(spec.name, len(context_bytes), len(examples))
    serialized = np.empty(len(examples), dtype=object)
    for i, example in enumerate(examples):
        serialized[i] = context_bytes + example.SerializeToString()
        limits.string(spec.name, len(serialized[i]))
    return serialized


def _feature_column(spec: TensorSpec, features: list[Feature], limits: RequestLimits) -> np.ndarray:
    kinds = {feature.WhichOneof("kind") for feature in features}
    if len(kinds) != 1 or None in kinds:
        raise InvalidArgument(
            f"feature {spec.name!r}: every example must give one kind of list "
            f"(float_list, int64_list or bytes_list), got {sorted(str(k) for k in kinds)}"
        )
    (kind,) = kinds
    assert kind is not None
    values = [getattr(feature, kind).value for feature in features]
    widths = {len(row) for row in values}
    if len(widths) != 1:
        raise InvalidArgument(
            f"feature {spec.name!r}: every example must give the same number of values, got {sorted(widths)}"
        )
    limits.elements(spec.name, [len(values), *widths])  # before the values are copied out
    dtype = np.dtype(_FEATURE_DTYPES[kind])
    if kind == "bytes_list":
        for row in values:
            for item in row:
                limits.string(spec.name, len(item))
        array: np.ndarray[Any, Any] = np.array([list(row) for row in values], dtype=dtype)
    else:  # in steps (read_values): on a decode thread, the event loop runs between them
        array = np.empty((len(values), *widths), dtype=dtype)
        for i, row in enumerate(values):
            array[i] = read_values(row, dtype)
    if spec.shape is not None and len(spec.shape) == 1 and widths == {1}:
        array = array.reshape(len(values))
    return array


def _fill_classifications(result: ps.ClassificationResult, response: InferenceResponse) -> None:
    for labels, row in classification_rows(response):
        classifications = result.classifications.add()
        for label, score in zip(labels, row, strict=True):
            classifications.classes.add(label=label, score=score)


def _fill_regressions(result: ps.RegressionResult, response: InferenceResponse, count: int) -> None:
    for value in regression_values(response, count)[1].tolist():
        result.regressions.add(value=value)


def add_to_server(
    server: grpc.aio.Server,
    service: InferenceService,
    control: ModelControl,
    max_tensor_bytes: int,
    limits: RequestLimits,
    tensor_content: bool = False,
    decode_pool: BodyDecoder | None = None,
) -> None:
    """Serve PredictionService and ModelService on ``server`` (see ``PredictionServicer``)."""
    ps_grpc.add_PredictionServiceServicer_to_server(  # type: ignore[no-untyped-call]
        PredictionServicer(service, max_tensor_bytes, limits, tensor_content, decode_pool), server
    )
    ms_grpc.add_ModelServiceServicer_to_server(  # type: ignore[no-untyped-call]
        ModelServicer(service, control), server
    )
