"""The optimizing metric: built-in quality metrics, or a user's function, and which output feeds it.

Built-ins (scikit-learn's implementations): ``accuracy``, ``precision``, ``recall``, ``f1``
(averaged over classes, ``macro`` unless told otherwise), ``auc`` (ROC AUC: binary, or one-vs-rest
macro over classes), all higher-is-better; ``mae`` and ``rmse``, lower-is-better.

A user's function is ``path/to/file.py:func`` or ``package.module:func``, called as
``func(y_true, y_pred) -> float``, higher-is-better unless ``--direction min``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferd.errors import InvalidArgument

CLASSIFICATION = ("accuracy", "precision", "recall", "f1")
BUILT_IN = (*CLASSIFICATION, "auc", "mae", "rmse")
LOWER_IS_BETTER = ("mae", "rmse")
AVERAGES = ("macro", "micro", "weighted", "binary")
_LABEL_NAMES = ("label", "labels", "predictions", "output_label", "classes", "class_ids")


@dataclass(frozen=True, slots=True)
class Objective:
    """The optimizing metric: its name, direction, and how to compute it from outputs."""

    name: str
    higher_is_better: bool
    spec: str
    """What the user wrote: a built-in name or ``file.py:func`` / ``module:func``."""
    average: str = "macro"
    output: str | None = None
    """The model output to score; None picks one by the metric's kind (see ``prediction``)."""

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def score(self, labels: np.ndarray, outputs: Mapping[str, np.ndarray]) -> tuple[float, str]:
        """The metric on one candidate's outputs, and the output it used.

        Raises:
            InvalidArgument: no output fits the metric; labels or outputs the metric cannot take
                (text labels for ``mae``, NaN predictions, one class for ``auc``: a metric that
                is not a finite number); or the user's function failed or returned something
                that is not a finite number.
        """
        if self.spec not in BUILT_IN:
            return self._scored(labels, outputs)
        try:
            value, name = self._scored(labels, outputs)
        except (ValueError, TypeError) as exc:  # scikit-learn's and numpy's refusals
            raise InvalidArgument(f"--optimize {self.spec}: {exc}") from None
        if not math.isfinite(value):
            raise InvalidArgument(
                f"--optimize {self.spec} on output {name!r} is {value}, not a number: it is undefined "
                "for these labels (e.g. auc needs at least two classes among them)"
            )
        return value, name

    def _scored(self, labels: np.ndarray, outputs: Mapping[str, np.ndarray]) -> tuple[float, str]:
        if self.spec not in BUILT_IN:
            name, y_pred = self._chosen(outputs, _labels_output)
            function = load_function(self.spec)
            try:
                value = float(function(labels, y_pred))
            except Exception as exc:  # the user's code: report what it raised
                raise InvalidArgument(f"--optimize {self.spec} raised {type(exc).__name__}: {exc}") from exc
            if not math.isfinite(value):
                raise InvalidArgument(f"--optimize {self.spec} returned {value}, expected a finite number")
            return value, name
        from sklearn import metrics

        if self.spec in ("mae", "rmse"):
            name, y_pred = self._chosen(outputs, _values_output)
            truth = np.asarray(labels, dtype=np.float64)
            error = metrics.mean_absolute_error if self.spec == "mae" else metrics.root_mean_squared_error
            return float(error(truth, y_pred.reshape(len(truth), -1).squeeze(-1))), name
        if self.spec == "auc":
            name, scores = self._chosen(outputs, _scores_output)
            multi = scores.ndim == 2 and scores.shape[1] > 2
            if scores.ndim == 2:
                scores = scores if multi else scores[:, -1]
            try:
                return float(metrics.roc_auc_score(labels, scores, multi_class="ovr", average="macro")), name
            except ValueError as exc:
                raise InvalidArgument(f"auc on output {name!r}: {exc}") from None
        name, y_pred = self._chosen(outputs, _labels_output)
        truth, y_pred = _comparable(labels, y_pred)
        if self.spec == "accuracy":
            return float(metrics.accuracy_score(truth, y_pred)), name
        function = {
            "precision": metrics.precision_score,
            "recall": metrics.recall_score,
            "f1": metrics.f1_score,
        }[self.spec]
        try:
            return float(function(truth, y_pred, average=self.average, zero_division=0)), name
        except ValueError as exc:
            raise InvalidArgument(f"{self.spec} on output {name!r}: {exc}") from None

    def _chosen(
        self,
        outputs: Mapping[str, np.ndarray],
        pick: Callable[[Mapping[str, np.ndarray]], tuple[str, np.ndarray] | None],
    ) -> tuple[str, np.ndarray]:
        if self.output is not None:
            if self.output not in outputs:
                raise InvalidArgument(f"--output {self.output!r}: the model has outputs {sorted(outputs)}")
            value = outputs[self.output]
            if pick is _labels_output and value.ndim == 2 and value.shape[1] > 1 and value.dtype.kind == "f":
                return self.output, value.argmax(axis=1)
            return self.output, value
        found = pick(outputs)
        if found is None:
            raise InvalidArgument(
                f"no output of {sorted(outputs)} fits {self.name}; name the one to score with --output"
            )
        return found


def objective(
    spec: str, direction: str | None = None, average: str = "macro", output: str | None = None
) -> Objective:
    """The objective ``--optimize`` names; user functions are loaded now, to fail early.

    Raises:
        InvalidArgument: an unknown metric name, or a function that cannot be loaded.
    """
    if average not in AVERAGES:
        raise InvalidArgument(f"--average: expected one of {list(AVERAGES)}, got {average!r}")
    if direction not in (None, "max", "min"):
        raise InvalidArgument(f"--direction: expected max or min, got {direction!r}")
    if spec in BUILT_IN:
        higher = spec not in LOWER_IS_BETTER
        name = spec
    elif ":" in spec:
        name = load_function(spec).__name__
        higher = True
    else:
        raise InvalidArgument(
            f"--optimize: unknown metric {spec!r}; expected one of {list(BUILT_IN)}, "
            "or a function as path/to/file.py:func or module:func"
        )
    if direction is not None:
        higher = direction == "max"
    return Objective(name, higher, spec, average, output)


def load_function(spec: str) -> Callable[..., Any]:
    """The function ``file.py:func`` or ``module:func`` names.

    Raises:
        InvalidArgument: the file or module does not import, or has no such callable.
    """
    where, _, attribute = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where)
            module_spec = importlib.util.spec_from_file_location(f"inferd_select_metric_{path.stem}", path)
            if module_spec is None or module_spec.loader is None or not path.is_file():
                raise FileNotFoundError(f"no file {where}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as exc:  # the user's module: report what it raised
        raise InvalidArgument(
            f"--optimize {spec}: cannot import {where}: {type(exc).__name__}: {exc}"
        ) from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise InvalidArgument(f"--optimize {spec}: {where} has no function {attribute!r}")
    return function  # type: ignore[no-any-return]


def _labels_output(outputs: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
    """Predicted classes: an output named like labels, else a one-value-per-row output that is
    not a float score, else the argmax of a float ``[n, k>1]`` output (class index), else the only
    output."""
    for name in _LABEL_NAMES:
        if name in outputs and _per_row(outputs[name]):
            return name, outputs[name].reshape(len(outputs[name]))
    for name, value in outputs.items():
        if _per_row(value) and value.dtype.kind != "f":
            return name, value.reshape(len(value))
    for name, value in outputs.items():
        if value.ndim == 2 and value.shape[1] > 1 and value.dtype.kind == "f":
            return name, value.argmax(axis=1)
    if len(outputs) == 1:
        ((name, value),) = outputs.items()
        return name, value
    return None


def _scores_output(outputs: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
    """Class scores: a float ``[n, k>1]`` output (probabilities), else a float one-per-row output."""
    for name, value in outputs.items():
        if value.ndim == 2 and value.shape[1] > 1 and value.dtype.kind == "f":
            return name, value
    for name, value in outputs.items():
        if _per_row(value) and value.dtype.kind == "f":
            return name, value.reshape(len(value))
    return None


def _values_output(outputs: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
    """Regression values: a numeric one-value-per-row output."""
    for name, value in outputs.items():
        if _per_row(value) and value.dtype.kind in "fiu":
            return name, value.reshape(len(value))
    return None


def _per_row(value: np.ndarray) -> bool:
    return value.ndim == 1 or (value.ndim == 2 and value.shape[1] == 1)


def _comparable(labels: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predictions of one type: numbers when both are numeric, else text (a CSV label
    column of strings against a model's string classes, or numbers read as text)."""
    predicted = predicted.reshape(len(predicted))
    if labels.dtype.kind in "biuf" and predicted.dtype.kind in "biuf":
        return labels, predicted
    as_text = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else str(v), otypes=[object])
    return as_text(labels).astype(str), as_text(predicted).astype(str)
