"""The seam between inferd and ML frameworks: the ``Runtime`` and ``Model`` protocols, detection.

A runtime is a module ``inferd.runtimes.<name>`` exposing ``RUNTIME``; it imports its framework
only inside ``load``, so ``import inferd`` stays framework-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from inferd.config import ModelSettings
from inferd.errors import ModelLoadError
from inferd.types import DEFAULT_SIGNATURE, Signature, Tensors, TensorSpec, dtype_of


class Model(Protocol):
    """A loaded model version.

    ``predict`` takes and returns numpy arrays batched along axis 0, keyed by the signature's
    tensor names. It may be called from several threads at once: a model that is not
    thread-safe serialises its calls itself. It raises ``InvalidArgument`` when the input
    caused the failure. ``close`` frees the model; no call follows it.
    """

    @property
    def signatures(self) -> Mapping[str, Signature]: ...

    def predict(self, signature_name: str, inputs: Tensors) -> Tensors: ...

    def close(self) -> None: ...


@runtime_checkable
class Supervised(Protocol):
    """A model running in a process of its own, which can die while the server lives on."""

    def supervise(self, name: str, on_exit: Callable[[str], None]) -> None:
        """Name the version in messages; call ``on_exit(reason)`` once, from another thread, if
        the process dies unexpectedly (at once if it already has)."""
        ...


class Runtime(Protocol):
    """Loads one framework's model files from a version folder.

    ``gpu`` says whether it honours ``device = "cuda:N"``; a runtime without it is only asked
    to load models configured for the CPU.
    """

    name: str
    gpu: bool

    def load(self, version_dir: Path, settings: ModelSettings) -> Model:
        """Load the model in ``version_dir``; blocking, called from a loader thread.

        Raises:
            ModelLoadError: the files are missing, corrupt or of the wrong kind; the message
                names the file and what was expected.
        """
        ...


_RUNTIMES = {
    "onnx": ("onnx", "RUNTIME"),
    "sklearn": ("sklearn", "RUNTIME"),
    "python": ("python", "RUNTIME"),
    "tensorflow": ("tensorflow", "RUNTIME"),
    "tflite": ("tflite", "RUNTIME"),
    "torch": ("torch", "RUNTIME"),
    "xgboost": ("boosters", "XGBOOST"),
    "lightgbm": ("boosters", "LIGHTGBM"),
}
"""Runtime name -> (module under inferd.runtimes, attribute holding the runtime)."""

_ALIASES = {
    "onnxruntime": "onnx",
    "onnxruntime_onnx": "onnx",
    "scikit-learn": "sklearn",
    "scikit_learn": "sklearn",
    "custom": "python",
    "tensorflow_savedmodel": "tensorflow",
    "keras": "tensorflow",
    "litert": "tflite",
    "pytorch": "torch",
    "pytorch_libtorch": "torch",
}

_DETECTION = (
    ("model.py", "python"),
    ("*.onnx", "onnx"),
    ("saved_model.pb", "tensorflow"),
    ("*.keras", "tensorflow"),
    ("*.tflite", "tflite"),
    ("*.pt2", "torch"),
    ("*.pt", "torch"),
    ("*.pth", "torch"),
    ("*.skops", "sklearn"),
    ("*.joblib", "sklearn"),
    ("*.pkl", "sklearn"),
    ("*.pickle", "sklearn"),
    ("*.ubj", "xgboost"),
    ("*.json", "xgboost"),
    ("*.txt", "lightgbm"),
)
"""File patterns that identify a runtime, tried in order."""


def runtime_names() -> list[str]:
    return sorted(_RUNTIMES)


def detect_runtime(version_dir: Path) -> str:
    """Name the runtime for the files in ``version_dir``.

    Raises:
        ModelLoadError: no known model file is there.
    """
    for pattern, name in _DETECTION:
        if any(version_dir.glob(pattern)):
            return name
    patterns = ", ".join(pattern for pattern, _ in _DETECTION)
    raise ModelLoadError(
        f"no model file in {version_dir}: expected one of {patterns}, or set 'runtime' in inferd.toml"
    )


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name`` (aliases such as ``scikit-learn`` accepted).

    Raises:
        ModelLoadError: no runtime has that name.
    """
    canonical = _ALIASES.get(name.lower(), name.lower())
    location = _RUNTIMES.get(canonical)
    if location is None:
        raise ModelLoadError(f"unknown runtime {name!r}; expected one of {runtime_names()}")
    module_name, attribute = location
    runtime: Runtime = getattr(importlib.import_module(f"{__package__}.{module_name}"), attribute)
    return runtime


_RUNS_REPOSITORY_CODE = {
    "python": "model.py is Python code run with the server's rights",
    "tensorflow": (
        "TensorFlow graphs may read and write files (ReadFile, WriteFile ops) and Keras files may "
        "name Python classes to import"
    ),
    "torch": (
        "TorchScript archives hold code that runs at load, and torch programs may reach the file "
        "system (aten::from_file)"
    ),
}
"""Runtimes that ``--safe`` refuses outright, and why. The sklearn runtime refuses pickle and
joblib files itself and keeps skops files."""


def load_model(version_dir: Path, settings: ModelSettings, platform: str | None) -> tuple[Model, str]:
    """Load a version with the runtime named by ``platform``, then ``settings``, then detection;
    in a worker process when ``settings.isolation`` is ``process``.

    Returns:
        The model and the runtime's name.

    Raises:
        ModelLoadError: the runtime failed, or ``settings.safe`` and the format runs code.
    """
    name = platform or settings.runtime or detect_runtime(version_dir)
    if settings.prefer_tflite and (version_dir / "model.tflite").is_file() and name.lower() == "tensorflow":
        name = "tflite"  # --prefer_tflite_model, as TF Serving: the SavedModel folder's model.tflite
    runtime = get_runtime(name)
    if settings.safe and runtime.name in _RUNS_REPOSITORY_CODE:
        raise ModelLoadError(
            f"--safe refuses the {runtime.name} runtime: {_RUNS_REPOSITORY_CODE[runtime.name]}; "
            "serve ONNX, TFLite, skops, XGBoost or LightGBM files, or drop --safe for a trusted repository"
        )
    if settings.device != "cpu" and not runtime.gpu:
        raise ModelLoadError(
            f"the {runtime.name} runtime runs on the CPU only; remove device = {settings.device!r} "
            "from inferd.toml"
        )
    if settings.isolation == "process":
        from inferd.runtimes.worker import load_in_worker

        return load_in_worker(version_dir, settings, platform)
    return runtime.load(version_dir, settings), runtime.name


def cuda_index(device: str) -> int:
    """The GPU number of ``cuda:N``."""
    return int(device.partition(":")[2] or 0)


def import_framework(module: str, extra: str) -> Any:
    """Import a runtime's framework, or say which inferd extra installs it.

    Raises:
        ModelLoadError: the framework is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelLoadError(
            f"this model needs {module}, which is not installed ({exc}); pip install 'inferd[{extra}]'"
        ) from exc


def find_model_file(version_dir: Path, patterns: tuple[str, ...], chosen: object = None) -> Path:
    """The one model file in ``version_dir`` matching ``patterns`` (earlier patterns first), or
    the file named by the ``file`` option.

    Raises:
        ModelLoadError: none, or several with no ``file`` option to choose.
    """
    if chosen is not None:
        if not isinstance(chosen, str):
            raise ModelLoadError(f"option 'file' must be a file name, got {chosen!r}")
        path = version_dir / chosen
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        return path
    for pattern in patterns:
        found = sorted(p for p in version_dir.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = [p.name for p in found]
            raise ModelLoadError(f"several model files in {version_dir}: {names}; set 'file' in inferd.toml")
    raise ModelLoadError(f"no model file in {version_dir}: expected {' or '.join(patterns)}")


def check_options(runtime: str, options: Mapping[str, object], known: set[str]) -> None:
    """Refuse option keys a runtime does not know, naming them.

    Raises:
        ModelLoadError: an unknown key is present.
    """
    unknown = sorted(set(options) - known)
    if unknown:
        raise ModelLoadError(f"unknown [{runtime}] option(s) {unknown}; expected some of {sorted(known)}")


def int_option(runtime: str, options: Mapping[str, Any], key: str, default: int) -> int:
    """An integer option >= 0 of a runtime's table.

    Raises:
        ModelLoadError: the value is not such an integer.
    """
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelLoadError(f"[{runtime}] {key} must be an integer >= 0, got {value!r}")
    return value


def parse_signature(declared: Any, where: str) -> Signature:
    """Build a Signature from ``{"inputs": [...], "outputs": [...]}`` declarations.

    Raises:
        ModelLoadError: a field is missing or has the wrong type, naming it.
    """
    if not isinstance(declared, Mapping):
        raise ModelLoadError(f"{where} must be a table with 'inputs' and 'outputs'")
    inputs = declared_specs(declared, "inputs", where)
    outputs = declared_specs(declared, "outputs", where)
    if inputs is None or outputs is None:
        raise ModelLoadError(f"{where}: 'inputs' and 'outputs' must be non-empty lists of tensors")
    return Signature(DEFAULT_SIGNATURE, inputs, outputs)


def declared_specs(declared: Mapping[str, Any], part: str, where: str) -> tuple[TensorSpec, ...] | None:
    """The ``inputs`` or ``outputs`` list of a declared signature; None when it is absent.

    Raises:
        ModelLoadError: the list is empty or an entry is malformed, naming it.
    """
    entries = declared.get(part)
    if entries is None:
        return None
    if not isinstance(entries, list) or not entries:
        raise ModelLoadError(f"{where}: '{part}' must be a non-empty list of tensors")
    return tuple(_tensor_spec(entry, f"{where} {part}[{i}]") for i, entry in enumerate(entries))


def _tensor_spec(entry: Any, where: str) -> TensorSpec:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise ModelLoadError(f"{where} needs a string 'name'")
    try:
        dtype = dtype_of(str(entry.get("dtype", ""))).numpy
    except KeyError:
        raise ModelLoadError(
            f"{where}: unknown dtype {entry.get('dtype')!r}, e.g. float32, int64, string"
        ) from None
    shape = entry.get("shape")
    if shape is not None and not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape)
    ):
        raise ModelLoadError(f"{where}: shape must be a list of integers (-1 for a free dimension)")
    return TensorSpec(entry["name"], dtype, None if shape is None else tuple(shape))
