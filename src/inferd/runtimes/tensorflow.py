"""TensorFlow SavedModels (``saved_model.pb``) and Keras models (``*.keras``).

A SavedModel (TF1 ``SavedModelBuilder`` or TF2 ``tf.saved_model.save``) is loaded as TF Serving
loads it: the MetaGraphDef with the ``tags`` asked for, into a session. Every signature is served
with the names, dtypes, shapes and method names its SignatureDef records, and graph tensor names
(``x:0``); a request with no ``signature_name`` gets ``serving_default``. Declared shapes are not
enforced: the graph takes what it can compute (TF Serving answers ``[2.0, 3.0]`` for an input
declared ``[-1, 1]``) and its refusals are INVALID_ARGUMENT with TensorFlow's message. String
tensors (DT_STRING) travel as bytes. ``assets.extra/tf_serving_warmup_requests`` (a TFRecord of
PredictionLogs), when present, is replayed before the version serves.

A ``.keras`` file is loaded with Keras and served as one ``serving_default`` signature: its
inputs and outputs keep the names of the model's input and output tensors (a single output is
``output_0``, as ``model.export`` names it).

Options (``[tensorflow]`` in inferd.toml; the server's TF Serving flags fill those not given):
    file: the ``.keras`` file to serve when the folder holds several, or holds a SavedModel too
        (without it, ``saved_model.pb`` wins).
    tags: comma-separated MetaGraphDef tags (``--saved_model_tags``, default ``serve``).
    intra_op_parallelism, inter_op_parallelism: session threads (``--tensorflow_*_parallelism``;
        0 lets TensorFlow choose).
    warmup_iterations: replays of each warm-up request (0 skips the file; ``--enable_model_warmup``).

``device = "cuda:N"`` places a SavedModel's graph on that GPU (soft placement keeps ops without
a GPU kernel on the CPU), and runs a Keras model's calls in ``tf.device("/GPU:N")``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument, ModelLoadError
from inferd.runtimes.runtime import check_options, cuda_index, find_model_file, import_framework, int_option
from inferd.types import DEFAULT_SIGNATURE, Method, Signature, Tensors, TensorSpec

log = logging.getLogger(__name__)


class TensorFlowModel:
    """Calls one TensorFlow function per signature, in the configured device's scope.

    A SavedModel's signatures run on one session, which several threads may call at once (TF
    Serving does); ``close`` closes the session. A Keras model is called through ``model(x, training=False)``,
    whose layers keep Python state, so its calls are serialised.
    """

    def __init__(
        self,
        tf: Any,
        functions: Mapping[str, Callable[[Tensors], Mapping[str, Any]]],
        signatures: Mapping[str, Signature],
        device: str,
        keep_alive: object,
    ) -> None:
        self._tf = tf
        self._functions = dict(functions)
        self._signatures = dict(signatures)
        self._device = "/CPU:0" if device == "cpu" else f"/GPU:{cuda_index(device)}"
        self._keep_alive = keep_alive  # the loaded object that owns the functions' variables

    @property
    def signatures(self) -> Mapping[str, Signature]:
        return self._signatures

    def predict(self, signature_name: str, inputs: Tensors) -> Tensors:
        tf = self._tf
        try:
            with tf.device(self._device):
                outputs = self._functions[signature_name](inputs)
        except tf.errors.InvalidArgumentError as exc:
            raise InvalidArgument(exc.message) from exc  # TensorFlow's words, as TF Serving answers
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"tensorflow rejected the input: {type(exc).__name__}: {exc}") from exc
        return {name: np.asarray(value) for name, value in outputs.items()}

    def close(self) -> None:
        self._functions.clear()
        if isinstance(self._keep_alive, self._tf.compat.v1.Session):
            self._keep_alive.close()
        self._keep_alive = None


_OPTIONS = {"file", "tags", "intra_op_parallelism", "inter_op_parallelism", "warmup_iterations"}


class TensorFlowRuntime:
    name = "tensorflow"
    gpu = True

    def load(self, version_dir: Path, settings: ModelSettings) -> TensorFlowModel:
        check_options(self.name, settings.options(self.name), _OPTIONS)
        tf = import_framework("tensorflow", "tensorflow")
        device = settings.device
        if device != "cpu":
            _check_gpu(tf, device)
        if (version_dir / "saved_model.pb").is_file() and "file" not in settings.options(self.name):
            return _load_saved_model(tf, version_dir, device, settings.options(self.name))
        path = find_model_file(version_dir, ("*.keras",), settings.options(self.name).get("file"))
        return _load_keras(tf, path, device)


def _check_gpu(tf: Any, device: str) -> None:
    """Refuse a GPU tensorflow cannot see; let it grow its memory on each GPU as models need it,
    rather than take all of it for the first model loaded."""
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) <= cuda_index(device):
        raise ModelLoadError(f"device {device!r} asks for a GPU, but tensorflow sees {len(gpus)} GPU(s)")
    for gpu in gpus:
        # RuntimeError: the GPUs were initialised by an earlier model; their setting stays.
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)


_METHODS = {method.value: method for method in Method}
_WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"


def _load_saved_model(tf: Any, version_dir: Path, device: str, options: Mapping[str, Any]) -> TensorFlowModel:
    """Load the MetaGraphDef tagged ``tags`` into a session, as TF Serving does: signatures with
    their method names and graph tensor names, calls that feed the graph directly (the graph, not
    the declared shapes, judges the inputs), and the warm-up file replayed."""
    tags = [tag.strip() for tag in str(options.get("tags", "serve")).split(",") if tag.strip()]
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=int_option("tensorflow", options, "intra_op_parallelism", 0),
        inter_op_parallelism_threads=int_option("tensorflow", options, "inter_op_parallelism", 0),
        allow_soft_placement=True,
    )
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph, config=config)
    placement = graph.device(f"/GPU:{cuda_index(device)}") if device != "cpu" else contextlib.nullcontext()
    try:
        with graph.as_default(), placement, _quiet_deprecation():
            meta_graph = tf.compat.v1.saved_model.loader.load(
                session, tags, str(version_dir), clear_devices=device != "cpu"
            )
    except Exception as exc:  # tensorflow raises its own errors, protobuf and OS errors
        session.close()
        raise ModelLoadError(
            f"tensorflow could not load the SavedModel in {version_dir} with tags {tags}: {exc}"
        ) from exc
    defs = {
        name: sig
        for name, sig in meta_graph.signature_def.items()
        if not name.startswith("__") and sig.inputs and sig.outputs  # __saved_model_init_op
    }
    if not defs:
        session.close()
        raise ModelLoadError(
            f"the SavedModel in {version_dir} has no signatures; save it with "
            "tf.saved_model.save(obj, path, signatures=...) or Keras' model.export(path)"
        )
    signatures = {name: _signature_of_def(tf, graph, name, sig) for name, sig in defs.items()}
    functions = {name: _session_call(session, signatures[name]) for name in defs}
    if _variables_restored(tf, functions, signatures):
        model = TensorFlowModel(tf, functions, signatures, "cpu", session)
    else:
        session.close()
        model = _load_eager(tf, version_dir, tags, device, signatures)
    iterations = int_option("tensorflow", options, "warmup_iterations", 1)
    if iterations and (version_dir / _WARMUP_FILE).is_file():
        try:
            _replay_warmup(tf, model, version_dir / _WARMUP_FILE, iterations)
        except ModelLoadError:
            model.close()
            raise
    return model


def _variables_restored(
    tf: Any,
    functions: Mapping[str, Callable[[Tensors], Mapping[str, Any]]],
    signatures: Mapping[str, Signature],
) -> bool:
    """Whether the session holds the variables its signatures read. The TF1 loader does not
    restore every SavedModel written by TF2 (Keras 3 models saved with ``tf.saved_model.save``
    read variables it never creates); one call with zeros per numeric signature finds out, and
    only a missing variable (FailedPreconditionError) counts: any other refusal is the graph's
    judgement of zeros, not of the load."""
    for name, signature in signatures.items():
        if any(spec.dtype.kind in "OUS" or spec.shape is None for spec in signature.inputs):
            continue  # tf.Example and other string inputs: no zeros to build
        zeros = {
            spec.name: np.zeros([1 if d < 0 else d for d in spec.shape or ()], spec.dtype)
            for spec in signature.inputs
        }
        try:
            functions[name](zeros)
        except tf.errors.FailedPreconditionError:
            return False
        except Exception:  # the graph refusing zeros says nothing of the load
            continue
    return True


def _load_eager(
    tf: Any, version_dir: Path, tags: list[str], device: str, signatures: Mapping[str, Signature]
) -> TensorFlowModel:
    """The SavedModel through TF2's loader, for what the session cannot run: the signatures (with
    the MetaGraphDef's method and tensor names) call the restored concrete functions, which check
    input shapes themselves."""
    try:
        loaded = tf.saved_model.load(str(version_dir), tags=tags)
    except Exception as exc:  # tensorflow raises its own errors, protobuf and OS errors
        raise ModelLoadError(f"tensorflow could not load the SavedModel in {version_dir}: {exc}") from exc
    concrete = dict(loaded.signatures)
    missing = sorted(set(signatures) - set(concrete))
    if missing:
        raise ModelLoadError(f"the SavedModel in {version_dir} has no function for signatures {missing}")
    functions = {name: _eager_call(tf, concrete[name], signatures[name]) for name in signatures}
    return TensorFlowModel(tf, functions, signatures, device, loaded)


def _eager_call(tf: Any, function: Any, signature: Signature) -> Callable[[Tensors], Mapping[str, Any]]:
    dtypes = {spec.name: tf.string if spec.dtype.kind == "O" else spec.dtype for spec in signature.inputs}

    def call(inputs: Tensors) -> Mapping[str, Any]:
        tensors = {name: tf.constant(_feedable(value), dtype=dtypes[name]) for name, value in inputs.items()}
        return {name: value.numpy() for name, value in function(**tensors).items()}

    return call


def _signature_of_def(tf: Any, graph: Any, name: str, definition: Any) -> Signature:
    inputs = tuple(_spec_of_info(tf, graph, key, info) for key, info in sorted(definition.inputs.items()))
    outputs = tuple(_spec_of_info(tf, graph, key, info) for key, info in sorted(definition.outputs.items()))
    method = _METHODS.get(definition.method_name, Method.PREDICT)
    return Signature(name, inputs, outputs, method, runtime_checks_shapes=True)


def _spec_of_info(tf: Any, graph: Any, key: str, info: Any) -> TensorSpec:
    """The spec a TensorInfo declares, with the graph tensor's own dtype where they differ (some
    exports declare DT_FLOAT for a tf.Example string placeholder; the graph is what runs)."""
    dtype = tf.dtypes.as_dtype(info.dtype)
    # Composite tensors (sparse, ragged) have no single graph tensor: they keep the declaration.
    with contextlib.suppress(KeyError, ValueError):
        dtype = graph.get_tensor_by_name(info.name).dtype.base_dtype
    numpy_dtype = np.dtype(object) if dtype == tf.string else np.dtype(dtype.as_numpy_dtype)
    shape = info.tensor_shape
    dims = None if shape.unknown_rank else tuple(-1 if d.size < 0 else int(d.size) for d in shape.dim)
    return TensorSpec(key, numpy_dtype, dims, info.name)


def _session_call(session: Any, signature: Signature) -> Callable[[Tensors], Mapping[str, Any]]:
    """A callable that feeds the signature's graph tensors without Python's shape check, as TF
    Serving's C++ session does; the graph refuses what it cannot compute. ``Session.make_callable``
    and ``Session.run`` check feed shapes against the placeholders' in Python, so this uses the
    session's ``CallableOptions`` form (private in TensorFlow's Python API, stable since TF 1.x)."""
    from tensorflow.core.protobuf import config_pb2

    feeds = [spec.tensor_name for spec in signature.inputs]
    fetches = [spec.tensor_name for spec in signature.outputs]
    run = session._make_callable_from_options(config_pb2.CallableOptions(feed=feeds, fetch=fetches))

    def call(inputs: Tensors) -> Mapping[str, Any]:
        results = run(*(_feedable(inputs[spec.name]) for spec in signature.inputs))
        return {spec.name: value for spec, value in zip(signature.outputs, results, strict=True)}

    return call


def _feedable(value: np.ndarray) -> np.ndarray:
    """Strings as bytes: the session takes object arrays of bytes only."""
    if value.dtype.kind in "OU" and any(isinstance(item, str) for item in value.flat):
        encoded = [item.encode() if isinstance(item, str) else item for item in value.flat]
        return np.array(encoded, dtype=object).reshape(value.shape)
    return value


def _replay_warmup(tf: Any, model: TensorFlowModel, path: Path, iterations: int) -> None:
    """Replay TF Serving's warm-up file: a TFRecord of PredictionLog protos, of which predict,
    classify and regress logs are replayed ``iterations`` times each, as TF Serving does.

    Raises:
        ModelLoadError: the file is not a TFRecord of PredictionLogs, or a request fails.
    """
    from tensorflow.core.framework import tensor_pb2

    try:
        records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
        replayed = 0
        for number, record in enumerate(records):  # noqa: B007 (the message names it)
            for signature_name, inputs in _warmup_inputs(record, tensor_pb2, tf, model):
                for _ in range(iterations):
                    model.predict(signature_name, inputs)
                replayed += 1
    except InvalidArgument as exc:
        raise ModelLoadError(f"{path}: warm-up request {number} failed: {exc.message}") from exc
    except Exception as exc:  # tensorflow's and protobuf's errors on a corrupt file
        message = f"{path}: cannot replay the warm-up requests: {type(exc).__name__}: {exc}"
        raise ModelLoadError(message) from exc
    log.info("replayed %d warm-up request(s) from %s, %d time(s) each", replayed, path, iterations)


def _warmup_inputs(
    record: bytes, tensor_pb2: Any, tf: Any, model: TensorFlowModel
) -> list[tuple[str, Tensors]]:
    """The (signature, inputs) calls of one PredictionLog record. Its wire format is read field by
    field (PredictionLog: classify_log 2, regress_log 3, predict_log 6, each with request 1), so
    that inferd needs no copy of TF Serving's log protos."""
    calls = []
    for log_field, log in _fields(record):
        if log_field not in (2, 3, 6):
            continue  # metadata, multi-inference and session-run logs are not replayed
        for request_field, request in _fields(log):
            if request_field != 1:
                continue
            spec_name, inputs = "", {}
            for field_number, value in _fields(request):
                if field_number == 1:  # model_spec: signature_name is field 3
                    spec_name = next((v.decode() for f, v in _fields(value) if f == 3), "")
                elif log_field == 6 and field_number == 2:  # PredictRequest.inputs map entry
                    entry = dict(_fields(value))
                    tensor = tensor_pb2.TensorProto.FromString(entry.get(2, b""))
                    inputs[entry.get(1, b"").decode()] = tf.make_ndarray(tensor)
                elif log_field in (2, 3) and field_number == 2:  # Input: example_list 1, examples 1
                    examples = [v for f, lst in _fields(value) if f == 1 for g, v in _fields(lst) if g == 1]
                    name = spec_name or DEFAULT_SIGNATURE
                    (key,) = model.signatures[name].input_names()
                    inputs[key] = np.array(examples, dtype=object)
            calls.append((spec_name or DEFAULT_SIGNATURE, inputs))
    return calls


def _fields(message: bytes) -> list[tuple[int, bytes]]:
    """The length-delimited fields of a serialized protobuf message, as (number, bytes); varint
    and fixed-width fields are skipped."""
    found, i = [], 0
    while i < len(message):
        key, i = _varint(message, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(message, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _varint(message, i)
            found.append((number, message[i : i + size]))
            i += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {i}")
    return found


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data):
            raise ValueError("truncated protobuf varint")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7


def _load_keras(tf: Any, path: Path, device: str) -> TensorFlowModel:
    keras = import_framework("keras", "tensorflow")
    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as exc:  # keras raises zipfile, JSON and its own errors on bad files
        raise ModelLoadError(f"keras could not load {path.name}: {type(exc).__name__}: {exc}") from exc
    inputs = tuple(_keras_spec(t.name, t) for t in model.inputs)
    named = getattr(model, "output", None)  # a dict of outputs: named by their keys
    if isinstance(named, Mapping):
        outputs = tuple(_keras_spec(name, t) for name, t in sorted(named.items()))
    else:
        outputs = tuple(_keras_spec(f"output_{i}", t) for i, t in enumerate(model.outputs))
    lock = threading.Lock()

    def call(tensors: Tensors) -> Mapping[str, Any]:
        args = [tensors[spec.name] for spec in inputs]
        with lock:
            result = model(args[0] if len(args) == 1 else args, training=False)
        values: Sequence[Any] = result if isinstance(result, list | tuple) else [result]
        if isinstance(result, Mapping):
            values = [result[spec.name] for spec in outputs]
        return {spec.name: keras.ops.convert_to_numpy(v) for spec, v in zip(outputs, values, strict=True)}

    signature = Signature(DEFAULT_SIGNATURE, inputs, outputs)
    return TensorFlowModel(tf, {DEFAULT_SIGNATURE: call}, {DEFAULT_SIGNATURE: signature}, device, model)


def _keras_spec(name: str, tensor: Any) -> TensorSpec:
    shape = tuple(-1 if d is None else int(d) for d in tensor.shape)
    return TensorSpec(name, np.dtype(object) if tensor.dtype == "string" else np.dtype(tensor.dtype), shape)


RUNTIME = TensorFlowRuntime()


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """Hide the deprecation notice TensorFlow logs (once, at WARNING) for the TF1 loader, which is
    the one that keeps a SavedModel's method names and graph tensor names as TF Serving does."""
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    tf_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tf_log.setLevel(level)
