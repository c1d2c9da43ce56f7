"""Custom Python models: a ``model.py`` in the version folder.

The contract is a class (``Model`` unless ``[python] class`` names another) with::

    class Model:
        signature = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
                     "outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}]}
        def load(self) -> None: ...          # read weights; Path(__file__).parent is the folder
        def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

``signature`` may instead be the ``[signature]`` table of inferd.toml. Calls are serialised
unless the class sets ``thread_safe = True``. ``close()``, when defined, runs at unload.
``model.py`` runs with the server's rights: serve it only from a repository you trust. What it
raises that is no ``Exception`` (``sys.exit()``, ``KeyboardInterrupt``) fails the load or the call
like any error: it never stops the server.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import itertools
import sys
import threading
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument, ModelLoadError
from inferd.runtimes.runtime import check_options, parse_signature
from inferd.types import DEFAULT_SIGNATURE, Signature, Tensors


class PythonModel:
    """A user's model object behind the ``Model`` protocol."""

    def __init__(self, user: Any, signature: Signature, module_name: str) -> None:
        self._user = user
        self._signatures = {DEFAULT_SIGNATURE: signature}
        self._module_name = module_name
        self._lock: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if getattr(user, "thread_safe", False) else threading.Lock()
        )

    @property
    def signatures(self) -> Mapping[str, Signature]:
        return self._signatures

    def predict(self, signature_name: str, inputs: Tensors) -> Tensors:
        with self._lock:
            try:
                result = self._user.predict(inputs)
            except (ValueError, TypeError, KeyError) as exc:
                raise InvalidArgument(f"model.py rejected the input: {type(exc).__name__}: {exc}") from exc
            except (SystemExit, KeyboardInterrupt) as exc:
                raise _as_error("predict()", exc) from exc
        if not isinstance(result, Mapping):
            raise TypeError(f"model.py predict() returned {type(result).__name__}, expected a dict of arrays")
        return {name: np.asarray(value) for name, value in result.items()}

    def close(self) -> None:
        close = getattr(self._user, "close", None)
        if callable(close):
            try:
                close()
            except (SystemExit, KeyboardInterrupt) as exc:
                raise _as_error("close()", exc) from exc
        sys.modules.pop(self._module_name, None)


class PythonRuntime:
    name = "python"
    gpu = False

    def load(self, version_dir: Path, settings: ModelSettings) -> PythonModel:
        options = settings.options(self.name)
        check_options(self.name, options, {"class"})
        path = version_dir / "model.py"
        if not path.is_file():
            raise ModelLoadError(f"no model.py in {version_dir}")
        class_name = options.get("class", "Model")
        spec, module = _new_module(path)
        module_name = spec.name
        assert spec.loader is not None
        try:
            spec.loader.exec_module(module)
            cls = getattr(module, class_name, None)
            if not isinstance(cls, type):
                raise ModelLoadError(f"{path} defines no class {class_name!r}")
            user = cls()
            for method in ("load", "predict"):
                if not callable(getattr(user, method, None)):
                    raise ModelLoadError(f"class {class_name!r} in {path} has no {method}() method")
            declared = settings.signature or getattr(user, "signature", None)
            if not declared:
                raise ModelLoadError(
                    f"{path}: declare the signature as a 'signature' class attribute or as "
                    "[signature] in inferd.toml"
                )
            signature = parse_signature(declared, f"{path} signature")
            user.load()
        except ModelLoadError:
            sys.modules.pop(module_name, None)
            raise
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # anything the user's code raises
            sys.modules.pop(module_name, None)
            raise ModelLoadError(f"{path} failed to load: {type(exc).__name__}: {exc}") from exc
        return PythonModel(user, signature, module_name)


_module_names = threading.Lock()


def _new_module(path: Path) -> tuple[importlib.machinery.ModuleSpec, types.ModuleType]:
    """A module for ``path``, not yet executed, in ``sys.modules`` under a name of its own:
    ``inferd_user_model_<digest of the path>``, with ``_2``, ``_3``... while a loaded copy of the
    same file holds that name (a version loaded again while its old copy finishes its requests),
    so that closing one copy never takes the other's module away."""
    base = f"inferd_user_model_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    with _module_names:
        names = itertools.chain([base], (f"{base}_{i}" for i in itertools.count(2)))
        name = next(n for n in names if n not in sys.modules)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
    return spec, module


def _as_error(call: str, exc: BaseException) -> RuntimeError:
    """An ``Exception`` for the ``SystemExit`` or ``KeyboardInterrupt`` that model.py's ``call``
    raised, which would otherwise stop the thread or the event loop it ran on."""
    return RuntimeError(f"model.py {call} raised {type(exc).__name__}: {exc}")


RUNTIME = PythonRuntime()
