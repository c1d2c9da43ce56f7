"""Gradient-boosted trees from their native files: XGBoost and LightGBM.

Files: XGBoost ``*.ubj`` or ``*.json`` (``Booster.save_model``), LightGBM ``*.txt``
(``Booster.save_model``). Both run on the CPU.

Options (``[xgboost]`` or ``[lightgbm]`` in inferd.toml):
    file: the model file when the folder holds several.
    num_threads: threads for one predict call (default 1: inferd runs several requests at once).

Signatures, like scikit-learn's (input ``inputs``, ``[-1, n_features]``):
    serving_default: ``predictions``: the class index for classifiers, the value otherwise.
    predict_proba: ``probabilities`` ``[-1, n_classes]`` (classifiers).
    classify: ``classes`` (0..n_classes-1), ``scores`` (classifiers; answers ``:classify``).
    regress: ``outputs`` (regression objectives; answers ``:regress``).

A booster is a classifier when its objective gives probabilities (XGBoost ``binary:logistic``,
``multi:softprob``; LightGBM ``binary``, ``multiclass``) and a regressor for ``reg:*`` (XGBoost)
or ``regression*`` (LightGBM) objectives; other objectives serve ``serving_default`` only.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument, ModelLoadError
from inferd.runtimes.runtime import check_options, find_model_file, import_framework, int_option
from inferd.types import DEFAULT_SIGNATURE, Method, Signature, Tensors, TensorSpec

_OPTIONS = {"file", "num_threads"}


class _Kind(enum.Enum):
    CLASSIFIER = "classifier"
    REGRESSOR = "regressor"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class _Booster:
    """What the two frameworks have in common once loaded.

    ``predict`` maps a ``[n, n_features]`` array to the framework's output: probabilities
    (``[n]`` for binary, ``[n, k]`` otherwise) for classifiers, values otherwise.
    """

    predict: Callable[[np.ndarray], np.ndarray]
    kind: _Kind
    n_features: int
    n_classes: int
    input_dtype: np.dtype[Any]
    output_dtype: np.dtype[Any]
    errors: tuple[type[Exception], ...]


class BoosterModel:
    """A loaded booster. XGBoost documents ``inplace_predict`` as thread-safe, and LightGBM's
    C API predicts under a shared (reader) lock, so several threads may call at once."""

    def __init__(self, booster: _Booster, framework: str) -> None:
        self._booster: _Booster | None = booster
        self._framework = framework
        self._signatures = _signatures(booster)

    @property
    def signatures(self) -> Mapping[str, Signature]:
        return self._signatures

    def predict(self, signature_name: str, inputs: Tensors) -> Tensors:
        booster = self._booster
        assert booster is not None, "predict after close"
        try:
            raw = np.asarray(booster.predict(inputs["inputs"]))
        except booster.errors as exc:
            raise InvalidArgument(f"{self._framework} rejected the input: {exc}") from exc
        if booster.kind is not _Kind.CLASSIFIER:
            key = "outputs" if signature_name == "regress" else "predictions"
            return {key: raw}
        proba = raw
        if raw.ndim == 1:  # binary; or no rows, which xgboost answers flat for any number of classes
            two = booster.n_classes == 2
            proba = np.stack([1.0 - raw, raw], axis=1) if two else raw.reshape(-1, booster.n_classes)
        if signature_name == DEFAULT_SIGNATURE:
            return {"predictions": proba.argmax(axis=1).astype(np.int64)}
        if signature_name == "predict_proba":
            return {"probabilities": proba}
        classes = np.arange(booster.n_classes, dtype=np.int64)
        return {"classes": np.broadcast_to(classes, proba.shape), "scores": proba}

    def close(self) -> None:
        self._booster = None


def _signatures(booster: _Booster) -> dict[str, Signature]:
    inputs = (TensorSpec("inputs", booster.input_dtype, (-1, booster.n_features)),)
    out = booster.output_dtype
    if booster.kind is not _Kind.CLASSIFIER:
        sigs = {
            DEFAULT_SIGNATURE: Signature(DEFAULT_SIGNATURE, inputs, (TensorSpec("predictions", out, None),))
        }
        if booster.kind is _Kind.REGRESSOR:
            outputs = (TensorSpec("outputs", out, (-1,)),)
            sigs["regress"] = Signature("regress", inputs, outputs, Method.REGRESS)
        return sigs
    k = booster.n_classes
    index = np.dtype(np.int64)
    scores = TensorSpec("scores", out, (-1, k))
    return {
        DEFAULT_SIGNATURE: Signature(DEFAULT_SIGNATURE, inputs, (TensorSpec("predictions", index, (-1,)),)),
        "predict_proba": Signature("predict_proba", inputs, (TensorSpec("probabilities", out, (-1, k)),)),
        "classify": Signature(
            "classify", inputs, (TensorSpec("classes", index, (-1, k)), scores), Method.CLASSIFY
        ),
    }


class XGBoostRuntime:
    name = "xgboost"
    gpu = False

    def load(self, version_dir: Path, settings: ModelSettings) -> BoosterModel:
        xgb = import_framework("xgboost", "xgboost")
        options = settings.options(self.name)
        check_options(self.name, options, _OPTIONS)
        path = find_model_file(version_dir, ("*.ubj", "*.json"), options.get("file"))
        try:
            booster = xgb.Booster(model_file=str(path))
            booster.set_param({"nthread": int_option(self.name, options, "num_threads", 1)})
            learner = json.loads(booster.save_config())["learner"]
        except (xgb.core.XGBoostError, ValueError) as exc:  # ValueError: decoding xgboost's message
            raise ModelLoadError(f"xgboost could not load {path.name}: {exc}") from exc
        objective = learner["objective"]["name"]
        n_classes = int(learner["learner_model_param"].get("num_class", "0"))
        if objective in ("binary:logistic", "multi:softprob"):
            kind, n_classes = _Kind.CLASSIFIER, max(n_classes, 2)
        else:
            kind = _Kind.REGRESSOR if objective.startswith("reg:") else _Kind.OTHER

        def predict(x: np.ndarray) -> np.ndarray:
            return np.asarray(booster.inplace_predict(x, validate_features=False))

        return BoosterModel(
            _Booster(
                predict,
                kind,
                booster.num_features(),
                n_classes,
                np.dtype(np.float32),
                np.dtype(np.float32),
                (xgb.core.XGBoostError, ValueError),
            ),
            self.name,
        )


class LightGBMRuntime:
    name = "lightgbm"
    gpu = False

    def load(self, version_dir: Path, settings: ModelSettings) -> BoosterModel:
        lgb = import_framework("lightgbm", "lightgbm")
        options = settings.options(self.name)
        check_options(self.name, options, _OPTIONS)
        path = find_model_file(version_dir, ("*.txt",), options.get("file"))
        try:
            booster = lgb.Booster(model_str=_complete_lightgbm_model(path))
        except (lgb.basic.LightGBMError, ValueError) as exc:  # ValueError: a garbled pandas_categorical
            raise ModelLoadError(f"lightgbm could not load {path.name}: {exc}") from exc
        threads = int_option(self.name, options, "num_threads", 1)
        objective = str(booster.dump_model().get("objective", "")).split(" ")[0]
        if objective in ("binary", "multiclass", "multiclassova"):
            kind, n_classes = _Kind.CLASSIFIER, max(booster.num_model_per_iteration(), 2)
        else:
            kind = _Kind.REGRESSOR if objective.startswith("regression") else _Kind.OTHER
            n_classes = 0

        def predict(x: np.ndarray) -> np.ndarray:
            return np.asarray(booster.predict(x, num_threads=threads))

        return BoosterModel(
            _Booster(
                predict,
                kind,
                booster.num_feature(),
                n_classes,
                np.dtype(np.float64),
                np.dtype(np.float64),
                (lgb.basic.LightGBMError, ValueError),
            ),
            self.name,
        )


def _complete_lightgbm_model(path: Path) -> str:
    """The text of LightGBM model file ``path``.

    Raises:
        ModelLoadError: the file is cut short (say, still being copied) before its ``end of
            trees`` or ``end of parameters`` line: LightGBM aborts or crashes the process on
            such files instead of raising.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    if "end of trees" not in text or ("\nparameters:" in text and "end of parameters" not in text):
        raise ModelLoadError(
            f"lightgbm could not load {path.name}: not a complete LightGBM model file (it lacks its "
            "'end of trees' or 'end of parameters' line: cut short, or another kind of file)"
        )
    return text


XGBOOST = XGBoostRuntime()
LIGHTGBM = LightGBMRuntime()
