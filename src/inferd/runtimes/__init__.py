"""The seam between inferd and ML frameworks: the ``Runtime`` and ``Model`` protocols, detection.

A runtime is a module ``inferd.runtimes.<name>`` exposing ``RUNTIME``; it imports its framework
only inside ``load``, so ``import inferd`` stays framework-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from inferd.config import ModelSettings
from inferd.errors import ModelLoadError
from inferd.types import Signature, Tensors


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


class Runtime(Protocol):
    """Loads one framework's model files from a version folder."""

    name: str

    def load(self, version_dir: Path, settings: ModelSettings) -> Model:
        """Load the model in ``version_dir``; blocking, called from a loader thread.

        Raises:
            ModelLoadError: the files are missing, corrupt or of the wrong kind; the message
                names the file and what was expected.
        """
        ...


_MODULES = {"onnx": "onnx", "sklearn": "sklearn", "python": "python"}
"""Runtime name -> module under inferd.runtimes."""

_ALIASES = {
    "onnxruntime": "onnx",
    "onnxruntime_onnx": "onnx",
    "scikit-learn": "sklearn",
    "scikit_learn": "sklearn",
    "custom": "python",
}

_DETECTION = (
    ("model.py", "python"),
    ("*.onnx", "onnx"),
    ("*.skops", "sklearn"),
    ("*.joblib", "sklearn"),
    ("*.pkl", "sklearn"),
    ("*.pickle", "sklearn"),
)
"""File patterns that identify a runtime, tried in order."""


def runtime_names() -> list[str]:
    return sorted(_MODULES)


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
    module_name = _MODULES.get(canonical)
    if module_name is None:
        raise ModelLoadError(f"unknown runtime {name!r}; expected one of {runtime_names()}")
    runtime: Runtime = importlib.import_module(f"{__name__}.{module_name}").RUNTIME
    return runtime


def load_model(version_dir: Path, settings: ModelSettings, platform: str | None) -> tuple[Model, str]:
    """Load a version with the runtime named by ``platform``, then ``settings``, then detection.

    Returns:
        The model and the runtime's name.
    """
    runtime = get_runtime(platform or settings.runtime or detect_runtime(version_dir))
    return runtime.load(version_dir, settings), runtime.name


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
