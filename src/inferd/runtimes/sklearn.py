"""scikit-learn estimators and pipelines.

Files, in order of preference: ``*.skops`` (safe: skops refuses types it does not trust),
then ``*.joblib``, ``*.pkl``, ``*.pickle``. Pickle and joblib files run code while they load:
serve them only from a repository you trust. Under ``--safe`` only skops files load, with the
types skops trusts by default (``trusted_types`` is refused: the repository may not widen them).

Options (``[sklearn]`` in inferd.toml):
    file: the model file when the folder holds several.
    trusted_types: extra types that skops may load (skops names the untrusted ones it found).

Signatures:
    serving_default: ``inputs`` -> ``predictions`` (``estimator.predict``).
    predict_proba: ``inputs`` -> ``probabilities`` (classifiers with ``predict_proba``).
    classify: ``inputs`` -> ``classes``, ``scores`` (same classifiers; answers ``:classify``).
    regress: ``inputs`` -> ``outputs`` (regressors; answers ``:regress``).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument, ModelLoadError
from inferd.runtimes.runtime import check_options, find_model_file
from inferd.types import DEFAULT_SIGNATURE, Method, Signature, Tensors, TensorSpec

log = logging.getLogger(__name__)

_PATTERNS = ("*.skops", "*.joblib", "*.pkl", "*.pickle")
_FLOAT = np.dtype(np.float64)


class SklearnModel:
    """A fitted estimator. scikit-learn's predict methods do not mutate the estimator, so
    calls from several threads at once are safe."""

    def __init__(self, estimator: Any) -> None:
        self._estimator = estimator
        self._signatures = _signatures(estimator)

    @property
    def signatures(self) -> Mapping[str, Signature]:
        return self._signatures

    @property
    def estimator(self) -> Any:
        """The fitted estimator (``inferd optimize`` converts it to ONNX)."""
        return self._estimator

    def predict(self, signature_name: str, inputs: Tensors) -> Tensors:
        x = inputs["inputs"]
        est = self._estimator
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "X does not have valid feature names"
                if signature_name == DEFAULT_SIGNATURE:
                    return {"predictions": np.asarray(est.predict(x))}
                if signature_name == "predict_proba":
                    return {"probabilities": np.asarray(est.predict_proba(x))}
                if signature_name == "classify":
                    scores = np.asarray(est.predict_proba(x))
                    return {
                        "classes": np.broadcast_to(est.classes_, scores.shape),
                        "scores": scores,
                    }
                return {"outputs": np.asarray(est.predict(x), dtype=np.float64)}
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"scikit-learn rejected the input: {exc}") from exc

    def close(self) -> None:
        self._estimator = None


def _signatures(est: Any) -> dict[str, Signature]:
    from sklearn.base import is_regressor

    n_features = getattr(est, "n_features_in_", None)
    if n_features is None:  # e.g. a text pipeline that starts with a vectorizer
        inputs = (TensorSpec("inputs", np.dtype(object), (-1,)),)
    else:
        inputs = (TensorSpec("inputs", _FLOAT, (-1, int(n_features))),)
    n_outputs = int(getattr(est, "n_outputs_", 1))
    out_shape = (-1,) if n_outputs == 1 else (-1, n_outputs)
    classes = getattr(est, "classes_", None)
    predicted = np.asarray(classes).dtype if classes is not None else _FLOAT
    sigs = {
        DEFAULT_SIGNATURE: Signature(
            DEFAULT_SIGNATURE, inputs, (TensorSpec("predictions", _dtype(predicted), out_shape),)
        )
    }
    if classes is not None and hasattr(est, "predict_proba"):
        k = len(classes)
        proba = TensorSpec("probabilities", _FLOAT, (-1, k))
        sigs["predict_proba"] = Signature("predict_proba", inputs, (proba,))
        sigs["classify"] = Signature(
            "classify",
            inputs,
            (
                TensorSpec("classes", _dtype(predicted), (-1, k)),
                TensorSpec("scores", _FLOAT, (-1, k)),
            ),
            Method.CLASSIFY,
        )
    if is_regressor(est):
        sigs["regress"] = Signature(
            "regress", inputs, (TensorSpec("outputs", _FLOAT, out_shape),), Method.REGRESS
        )
    return sigs


def _dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return np.dtype(object) if dtype.kind in "OUS" else dtype


class SklearnRuntime:
    name = "sklearn"
    gpu = False
    _pickle_lock = threading.Lock()

    def load(self, version_dir: Path, settings: ModelSettings) -> SklearnModel:
        options = settings.options(self.name)
        check_options(self.name, options, {"file", "trusted_types"})
        path = find_model_file(version_dir, _PATTERNS, options.get("file"))
        if settings.safe:
            _check_safe(path, options)
        estimator = _load_skops(path, options) if path.suffix == ".skops" else self._load_pickle(path)
        if not hasattr(estimator, "predict"):
            raise ModelLoadError(f"{path.name} holds a {type(estimator).__name__}, which has no predict()")
        return SklearnModel(estimator)

    def _load_pickle(self, path: Path) -> Any:
        import joblib

        log.warning("loading %s with joblib/pickle: this runs code from the file; trust its source", path)
        try:
            with self._pickle_lock:
                return joblib.load(path)
        except Exception as exc:  # unpickling can raise anything
            raise ModelLoadError(f"could not unpickle {path.name}: {type(exc).__name__}: {exc}") from exc


def _check_safe(path: Path, options: Mapping[str, Any]) -> None:
    """Refuse what ``--safe`` does not load: pickles, and a repository's extra trusted types.

    Raises:
        ModelLoadError: naming the rule.
    """
    if path.suffix != ".skops":
        raise ModelLoadError(
            f"--safe refuses {path.name}: pickle and joblib files run code from the file while they "
            "load; save the estimator with skops.io.dump as a .skops file"
        )
    if options.get("trusted_types"):
        raise ModelLoadError(
            "--safe refuses [sklearn] trusted_types: the repository may not widen the types skops trusts"
        )


def _load_skops(path: Path, options: Mapping[str, Any]) -> Any:
    import skops.io as sio

    trusted = options.get("trusted_types", [])
    if not isinstance(trusted, list) or not all(isinstance(t, str) for t in trusted):
        raise ModelLoadError(f"[sklearn] trusted_types must be a list of type names, got {trusted!r}")
    try:
        untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in trusted]
        if untrusted:
            raise ModelLoadError(
                f"{path.name} contains types skops does not trust: {untrusted}; "
                "if you trust this file, list them in [sklearn] trusted_types in inferd.toml"
            )
        return sio.load(path, trusted=trusted or None)
    except ModelLoadError:
        raise
    except Exception as exc:  # skops raises zipfile, json and its own errors on bad files
        raise ModelLoadError(f"could not load {path.name} with skops: {type(exc).__name__}: {exc}") from exc


RUNTIME = SklearnRuntime()
