"""TFLite models (``*.tflite``) through the LiteRT interpreter (``ai-edge-litert``).

The edge path: a model converted for a phone or a microcontroller is served and measured with
the same APIs and tools as its full-size original. Every signature the converter recorded
(``TFLiteConverter.from_saved_model`` and ``from_keras_model`` record them) is served with its
input and output names; batch dimensions the converter kept dynamic (-1 in
``shape_signature``) take any batch size, fixed ones take exactly that size.

Options (``[tflite]`` in inferd.toml):
    file: the ``.tflite`` file when the folder holds several.
    num_threads: interpreter threads for one call (default 1).

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
from inferd.runtimes import check_options, find_model_file, import_framework, int_option
from inferd.types import Signature, Tensors, TensorSpec


class TFLiteModel:
    """One LiteRT interpreter. An interpreter holds its tensors in place, so calls are
    serialised with a lock; serve more versions or processes for more parallelism."""

    def __init__(self, interpreter: Any, signatures: Mapping[str, Signature]) -> None:
        self._interpreter = interpreter
        self._runners = {name: interpreter.get_signature_runner(name) for name in signatures}
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
        if not names:
            raise ModelLoadError(
                f"{path.name} records no signatures; convert it with TFLiteConverter.from_saved_model "
                "or from_keras_model, which record them"
            )
        signatures = {name: _signature(name, interpreter.get_signature_runner(name)) for name in names}
        return TFLiteModel(interpreter, signatures)


def _signature(name: str, runner: Any) -> Signature:
    def specs(details: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(key, _dtype(d["dtype"]), tuple(int(n) for n in d["shape_signature"]))
            for key, d in sorted(details.items())
        )

    return Signature(name, specs(runner.get_input_details()), specs(runner.get_output_details()))


def _dtype(value: Any) -> np.dtype[Any]:
    dtype = np.dtype(value)
    return np.dtype(object) if dtype.kind in "SUO" else dtype


RUNTIME = TFLiteRuntime()
