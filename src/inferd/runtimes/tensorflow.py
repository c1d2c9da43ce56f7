"""TensorFlow SavedModels (``saved_model.pb``) and Keras models (``*.keras``).

A SavedModel, as ``tf.saved_model.save`` or Keras' ``model.export`` write it, serves every
signature it holds, with the names, dtypes and shapes the signatures declare; a request with
no ``signature_name`` gets ``serving_default``. String tensors (DT_STRING) travel as bytes.

A ``.keras`` file is loaded with Keras and served as one ``serving_default`` signature: its
inputs and outputs keep the names of the model's input and output tensors (a single output is
``output_0``, as ``model.export`` names it).

Options (``[tensorflow]`` in inferd.toml):
    file: the ``.keras`` file to serve when the folder holds several, or holds a SavedModel too
        (without it, ``saved_model.pb`` wins).

``device = "cuda:N"`` runs every call in ``tf.device("/GPU:N")``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument, ModelLoadError
from inferd.runtimes import check_options, cuda_index, find_model_file, import_framework
from inferd.types import DEFAULT_SIGNATURE, Signature, Tensors, TensorSpec


class TensorFlowModel:
    """Calls one TensorFlow function per signature, in the configured device's scope.

    A SavedModel's signature functions are concrete graphs that several threads may call at
    once (TF Serving does). A Keras model is called through ``model(x, training=False)``,
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
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            raise InvalidArgument(f"tensorflow rejected the input: {type(exc).__name__}: {exc}") from exc
        return {name: np.asarray(value) for name, value in outputs.items()}

    def close(self) -> None:
        self._functions.clear()
        self._keep_alive = None


class TensorFlowRuntime:
    name = "tensorflow"
    gpu = True

    def load(self, version_dir: Path, settings: ModelSettings) -> TensorFlowModel:
        check_options(self.name, settings.options(self.name), {"file"})
        tf = import_framework("tensorflow", "tensorflow")
        device = settings.device
        if device != "cpu":
            _check_gpu(tf, device)
        if (version_dir / "saved_model.pb").is_file() and "file" not in settings.options(self.name):
            return _load_saved_model(tf, version_dir, device)
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


def _load_saved_model(tf: Any, version_dir: Path, device: str) -> TensorFlowModel:
    try:
        loaded = tf.saved_model.load(str(version_dir))
    except Exception as exc:  # tensorflow raises its own errors, protobuf and OS errors
        raise ModelLoadError(f"tensorflow could not load the SavedModel in {version_dir}: {exc}") from exc
    concrete = dict(loaded.signatures)
    if not concrete:
        raise ModelLoadError(
            f"the SavedModel in {version_dir} has no signatures; save it with "
            "tf.saved_model.save(obj, path, signatures=...) or Keras' model.export(path)"
        )
    signatures = {name: _signature(name, fn) for name, fn in concrete.items()}
    functions = {name: _call_signature(tf, fn, signatures[name]) for name, fn in concrete.items()}
    return TensorFlowModel(tf, functions, signatures, device, loaded)


def _signature(name: str, function: Any) -> Signature:
    _, kwargs = function.structured_input_signature
    inputs = tuple(_spec(key, spec) for key, spec in sorted(kwargs.items()))
    outputs = tuple(_spec(key, spec) for key, spec in sorted(function.structured_outputs.items()))
    return Signature(name, inputs, outputs)


def _spec(name: str, spec: Any) -> TensorSpec:
    dtype = np.dtype(object) if spec.dtype.name == "string" else np.dtype(spec.dtype.as_numpy_dtype)
    rank = spec.shape.rank
    shape = None if rank is None else tuple(-1 if d is None else int(d) for d in spec.shape.as_list())
    return TensorSpec(name, dtype, shape)


def _call_signature(tf: Any, function: Any, signature: Signature) -> Callable[[Tensors], Mapping[str, Any]]:
    dtypes = {spec.name: tf.string if spec.dtype.kind == "O" else spec.dtype for spec in signature.inputs}

    def call(inputs: Tensors) -> Mapping[str, Any]:
        tensors = {name: tf.constant(value, dtype=dtypes[name]) for name, value in inputs.items()}
        return {name: value.numpy() for name, value in function(**tensors).items()}

    return call


def _load_keras(tf: Any, path: Path, device: str) -> TensorFlowModel:
    keras = import_framework("keras", "tensorflow")
    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as exc:  # keras raises zipfile, JSON and its own errors on bad files
        raise ModelLoadError(f"keras could not load {path.name}: {type(exc).__name__}: {exc}") from exc
    inputs = tuple(_keras_spec(t.name, t) for t in model.inputs)
    outputs = tuple(_keras_spec(f"output_{i}", t) for i, t in enumerate(model.outputs))
    lock = threading.Lock()

    def call(tensors: Tensors) -> Mapping[str, Any]:
        args = [tensors[spec.name] for spec in inputs]
        with lock:
            result = model(args[0] if len(args) == 1 else args, training=False)
        values = result if isinstance(result, list | tuple) else [result]
        return {spec.name: keras.ops.convert_to_numpy(v) for spec, v in zip(outputs, values, strict=True)}

    signature = Signature(DEFAULT_SIGNATURE, inputs, outputs)
    return TensorFlowModel(tf, {DEFAULT_SIGNATURE: call}, {DEFAULT_SIGNATURE: signature}, device, model)


def _keras_spec(name: str, tensor: Any) -> TensorSpec:
    shape = tuple(-1 if d is None else int(d) for d in tensor.shape)
    return TensorSpec(name, np.dtype(object) if tensor.dtype == "string" else np.dtype(tensor.dtype), shape)


RUNTIME = TensorFlowRuntime()
