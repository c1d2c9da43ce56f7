"""TFLite models (``*.tflite``) through the LiteRT interpreter (``ai-edge-litert``).

The edge path: a model converted for a phone or a microcontroller is served and measured with
the same APIs and tools as its full-size original. Every signature the converter recorded
(``TFLiteConverter.from_saved_model`` and ``from_keras_model`` record them) is served with its
input and output names; batch dimensions the converter kept dynamic (-1 in
``shape_signature``) take any batch size, fixed ones take exactly that size.

Options (``[tflite]`` in inferd.toml):
    file: the ``.tflite`` file when the folder holds several.
    num_threads: interpreter threads for one call (default 1).

A model that records no signature list (older converters) is served as TF Serving serves it:
with the SignatureDefs its ``signature_defs_metadata`` holds (TFLite's signature_def_util writes
them), else under ``serving_default`` with its input and output tensors' names; inputs are
resized to each request's shape.

Runs on the CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument, ModelLoadError
from inferd.runtimes.runtime import check_options, find_model_file, import_framework, int_option
from inferd.types import DEFAULT_SIGNATURE, Signature, Tensors, TensorSpec


class TFLiteModel:
    """One LiteRT interpreter. An interpreter holds its tensors in place, so calls are
    serialised with a lock; serve more versions or processes for more parallelism."""

    def __init__(
        self, interpreter: Any, signatures: Mapping[str, Signature], runners: Mapping[str, Any] | None = None
    ) -> None:
        self._interpreter = interpreter
        self._runners: dict[str, Any] = dict(
            runners or {name: interpreter.get_signature_runner(name) for name in signatures}
        )
        self._signatures = dict(signatures)
        self._lock = threading.Lock()

    @property
    def signatures(self) -> Mapping[str, Signature]:
        return self._signatures

    def predict(self, signature_name: str, inputs: Tensors) -> Tensors:
        with self._lock:
            try:
                outputs = self._runners[signature_name](**inputs)
            except (ValueError, RuntimeError) as exc:
                raise InvalidArgument(f"the TFLite interpreter rejected the input: {exc}") from exc
            # Output arrays may be views of the interpreter's buffers: copy before the next call.
            return {name: np.array(value) for name, value in outputs.items()}

    def close(self) -> None:
        self._runners.clear()
        self._interpreter = None


class TFLiteRuntime:
    name = "tflite"
    gpu = False

    def load(self, version_dir: Path, settings: ModelSettings) -> TFLiteModel:
        options = settings.options(self.name)
        check_options(self.name, options, {"file", "num_threads"})
        path = find_model_file(version_dir, ("*.tflite",), options.get("file"))
        litert = import_framework("ai_edge_litert.interpreter", "tflite")
        threads = int_option(self.name, options, "num_threads", 1) or None
        try:
            interpreter = litert.Interpreter(model_path=str(path), num_threads=threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT could not load {path.name}: {exc}") from exc
        names = list(interpreter.get_signature_list())
        if names:
            signatures = {name: _signature(name, interpreter.get_signature_runner(name)) for name in names}
            return TFLiteModel(interpreter, signatures)
        # As TF Serving: the SignatureDefs an older converter stored in the file's metadata, else
        # serving_default from the interpreter's own inputs and outputs.
        interpreter.allocate_tensors()
        runners = {
            name: _TensorRunner(interpreter, inputs, outputs)
            for name, (inputs, outputs) in _tensor_signatures(path, interpreter).items()
        }
        signatures = {name: runner.signature(name) for name, runner in runners.items()}
        return TFLiteModel(interpreter, signatures, runners)


def _signature(name: str, runner: Any) -> Signature:
    def specs(details: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(key, _dtype(d["dtype"]), tuple(int(n) for n in d["shape_signature"]))
            for key, d in sorted(details.items())
        )

    return Signature(name, specs(runner.get_input_details()), specs(runner.get_output_details()))


_Details = list[tuple[str, Mapping[str, Any]]]
"""(key in the signature, the interpreter's details of the tensor it names)."""


def _tensor_signatures(path: Path, interpreter: Any) -> dict[str, tuple[_Details, _Details]]:
    """The signatures of a model without a signature list, as key -> tensor details: those of
    the ``signature_defs_metadata`` entry (a FlexBuffer map of serialized SignatureDefs, which
    TFLite's signature_def_util writes), else ``serving_default`` with every input and output
    under its tensor's name.

    Raises:
        ModelLoadError: a stored SignatureDef names a tensor the model does not have.
    """
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    by_name = {d["name"]: d for d in [*inputs, *outputs]}
    stored = _stored_signature_defs(path.read_bytes())
    if not stored:
        return {DEFAULT_SIGNATURE: ([(d["name"], d) for d in inputs], [(d["name"], d) for d in outputs])}

    def details(infos: Mapping[str, Any]) -> _Details:
        found = []
        for key, info in sorted(infos.items()):
            tensor = info.name.removesuffix(":0")
            if tensor not in by_name:
                raise ModelLoadError(
                    f"{path.name}: signature input/output {key!r} names tensor {tensor!r}, "
                    f"which the model does not have (it has {sorted(by_name)})"
                )
            found.append((key, by_name[tensor]))
        return found

    return {name: (details(d.inputs), details(d.outputs)) for name, d in stored.items()}


def _stored_signature_defs(model: bytes) -> dict[str, Any]:
    """The SignatureDefs in a model's ``signature_defs_metadata`` entry; empty when it has none."""
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers import flexbuffers

    from inferd._proto.meta_graph_pb2 import SignatureDef

    root = schema.Model.GetRootAs(model, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name() == b"signature_defs_metadata":
            data = root.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
            stored = flexbuffers.GetRoot(data).AsMap
            return {
                key.AsKey: SignatureDef.FromString(bytes(value.AsStringBytes))
                for key, value in zip(stored.Keys, stored.Values, strict=True)
            }
    return {}


class _TensorRunner:
    """Calls an interpreter through its input and output tensors, resizing the inputs to the
    values given (a signature runner's interface, for models without a signature list). The
    interpreter, not inferd, judges the shapes."""

    def __init__(self, interpreter: Any, inputs: _Details, outputs: _Details) -> None:
        self._interpreter = interpreter
        self._inputs = inputs
        self._outputs = outputs

    def signature(self, name: str) -> Signature:
        def specs(details: _Details) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(key, _dtype(d["dtype"]), tuple(int(n) for n in d["shape_signature"]), d["name"])
                for key, d in details
            )

        return Signature(name, specs(self._inputs), specs(self._outputs), runtime_checks_shapes=True)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        interpreter = self._interpreter
        for key, detail in self._inputs:
            if tuple(interpreter.get_tensor(detail["index"]).shape) != inputs[key].shape:
                interpreter.resize_tensor_input(detail["index"], list(inputs[key].shape))
        interpreter.allocate_tensors()
        for key, detail in self._inputs:
            interpreter.set_tensor(detail["index"], inputs[key])
        interpreter.invoke()
        return {key: interpreter.get_tensor(detail["index"]) for key, detail in self._outputs}


def _dtype(value: Any) -> np.dtype[Any]:
    dtype = np.dtype(value)
    return np.dtype(object) if dtype.kind in "SUO" else dtype


RUNTIME = TFLiteRuntime()
