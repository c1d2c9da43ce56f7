"""``inferd optimize``: smaller or faster variants of a model, each a version folder inferd serves.

Every variant is written to ``OUT/<name>/`` with its model file and ``variant.json`` (how it was
made, its size, the tools' versions, and how its outputs compare with the original's on a few
rows), then loaded with inferd's own runtime and called once: a variant that does not load or
run is reported as failed. ``OUT/variants.json`` lists every attempted variant, failed or not,
with its folder relative to ``OUT``.
One variant's failure never stops the others.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from inferd.config import ModelSettings
from inferd.errors import InferdError, InvalidArgument
from inferd.optimize import onnx_variants
from inferd.optimize.calibration import Calibration
from inferd.optimize.check import check_variant, default_signature
from inferd.optimize.convert import Source, Unsupported, to_onnx
from inferd.optimize.native_logs import native_logs_to, quiet_tensorflow
from inferd.optimize.tflite import to_tflite
from inferd.repository import folder_bytes, resolve_version
from inferd.runtimes import find_model_file, load_model
from inferd.types import Signature

log = logging.getLogger(__name__)

_CONVERTERS = {
    "sklearn": ("scikit-learn", "skl2onnx"),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx"),
    "torch": ("torch", "onnxscript"),
}
"""Packages whose versions a variant records, by the original's runtime (besides onnx and
onnxruntime for the ONNX variants, tensorflow and keras for the TFLite ones)."""


@dataclass(frozen=True, slots=True)
class OptimizeOptions:
    """One ``inferd optimize`` run; see ``inferd optimize --help``."""

    model: Path
    out: Path
    calibration: str | None = None
    only: tuple[str, ...] = ()
    tflite: bool = False


@dataclass(frozen=True, slots=True)
class Variant:
    """One attempted variant: its folder, and the error when it failed."""

    name: str
    path: Path
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


EXACT_TOLERANCE = 1e-3
FP16_TOLERANCE = 2e-2
INT8_TOLERANCE = 1.0
"""Largest difference a variant's float outputs may have from the original's on the check rows,
relative to the original's largest magnitude (at least 1). Conversions that keep float32 should
agree to rounding (1e-6 measured), float16 to ~1e-3; int8 moves single probabilities by up to
0.53 on the tests' models, so its bound only catches outputs that are not the model's at all."""


@dataclass(frozen=True, slots=True)
class _Recipe:
    name: str
    family: str
    """``onnx`` (made from the ONNX base) or ``tflite`` (made from the Keras/TF original)."""
    method: str
    file: str
    calibrated: bool = False
    tolerance: float = EXACT_TOLERANCE


RECIPES = (
    _Recipe("onnx", "onnx", "conversion to ONNX", "model.onnx"),
    _Recipe("onnx-optimized", "onnx", "onnxruntime graph optimisation, saved", "model.onnx"),
    _Recipe("onnx-int8-dynamic", "onnx", "dynamic int8 quantisation", "model.onnx", tolerance=INT8_TOLERANCE),
    _Recipe("onnx-fp16", "onnx", "float16 conversion", "model.onnx", tolerance=FP16_TOLERANCE),
    _Recipe("onnx-mapped", "onnx", "weights saved as external data, to be served mapped", "model.onnx"),
    _Recipe(
        "onnx-int8-static",
        "onnx",
        "static int8 quantisation, calibrated",
        "model.onnx",
        calibrated=True,
        tolerance=INT8_TOLERANCE,
    ),
    _Recipe("tflite", "tflite", "conversion to TFLite", "model.tflite"),
    _Recipe(
        "tflite-int8-dynamic",
        "tflite",
        "TFLite dynamic-range int8 quantisation",
        "model.tflite",
        tolerance=INT8_TOLERANCE,
    ),
    _Recipe(
        "tflite-int8",
        "tflite",
        "TFLite full-integer int8 quantisation, calibrated",
        "model.tflite",
        calibrated=True,
        tolerance=INT8_TOLERANCE,
    ),
)
VARIANT_NAMES = tuple(recipe.name for recipe in RECIPES)


def chosen(options: OptimizeOptions, source_runtime: str) -> list[str]:
    """The variants a run attempts: ``--only``'s, else every ONNX variant (the calibrated one with
    ``--calibration``; not ``onnx`` when the model is ONNX already), plus TFLite's with ``--tflite``.

    Raises:
        InvalidArgument: ``--only`` names an unknown variant.
    """
    _refuse_unknown(options.only)
    if options.only:
        return [name for name in VARIANT_NAMES if name in options.only]
    names = []
    for recipe in RECIPES:
        if recipe.family == "tflite" and not options.tflite:
            continue
        if recipe.calibrated and options.calibration is None:
            continue
        if recipe.name == "onnx" and source_runtime == "onnx":
            continue
        names.append(recipe.name)
    return names


def _refuse_unknown(names: tuple[str, ...]) -> None:
    unknown = [name for name in names if name not in VARIANT_NAMES]
    if unknown:
        raise InvalidArgument(f"--only: unknown variant(s) {unknown}; expected some of {list(VARIANT_NAMES)}")


def run(options: OptimizeOptions, report: Callable[[Variant], None] = lambda _: None) -> list[Variant]:
    """Make the chosen variants of ``options.model`` under ``options.out``; ``report`` is called
    as each one is done.

    Raises:
        InferdError: the model does not load (MODEL_LOAD), or the options (``--out`` a folder that
            cannot be made) or calibration file are wrong (INVALID_ARGUMENT), before any variant
            is made.
    """
    _refuse_unknown(options.only)  # before the model loads
    quiet_tensorflow(log.isEnabledFor(logging.DEBUG))
    with native_logs_to(log):
        source = _load_source(options.model)
    try:
        names = chosen(options, source.runtime)
        calibration = Calibration(options.calibration)
        if calibration.given:  # a file that does not fit the model fails the run, not each variant
            calibration.rows(source.signature)
        outcomes = []
        try:
            options.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file there, or a folder this user may not write
            raise InvalidArgument(
                f"--out {options.out}: cannot make the folder: {exc.strerror or exc}"
            ) from None
        with tempfile.TemporaryDirectory(prefix="inferd-optimize-") as scratch:
            base = _OnnxBase(source, Path(scratch))
            for name in names:
                with native_logs_to(log):
                    outcome = _make(source, _recipe(name), options.out / name, base, calibration)
                outcomes.append(outcome)
                report(outcome)
        listing = [{"name": o.name, "path": o.path.name, "ok": o.ok, "error": o.error} for o in outcomes]
        (options.out / "variants.json").write_bytes(orjson.dumps(listing, option=orjson.OPT_INDENT_2))
        return outcomes
    finally:
        source.model.close()


def _load_source(model: Path) -> Source:
    # The same resolution as ``inferd batch``: a version folder, or a base path's latest version.
    plan = resolve_version(model)
    ((_, version),) = plan.aspired.items()
    loaded, runtime = load_model(version.path, plan.settings, plan.platform)
    return Source(version.path, runtime, plan.settings, loaded, default_signature(loaded))


def _recipe(name: str) -> _Recipe:
    return next(recipe for recipe in RECIPES if recipe.name == name)


class _OnnxBase:
    """The ONNX model the ``onnx-*`` variants start from: the original when it is ONNX, else its
    conversion, made once into a scratch folder."""

    def __init__(self, source: Source, scratch: Path) -> None:
        self._source, self._scratch = source, scratch
        self._made: Path | None = None
        self._failure: str | None = None
        self.parameters: dict[str, Any] = {}

    def path(self) -> Path:
        """The base ``.onnx`` file.

        Raises:
            Unsupported: the conversion failed (its reason, each time the base is asked for).
        """
        if self._source.runtime == "onnx":
            return self._folder_model(self._source.path)
        if self._failure is None and self._made is None:
            target = self._scratch / "model.onnx"
            try:
                self.parameters = to_onnx(self._source, target)
                self._made = target
            except Exception as exc:  # converters raise their frameworks' own errors
                self._failure = _describe(exc)
        if self._made is None:
            raise Unsupported(f"no ONNX model to start from: {self._failure}")
        return self._made

    def signature(self) -> Signature:
        """The base model's signature, as inferd's onnx runtime reads it."""
        if self._source.runtime == "onnx":
            return self._source.signature
        model, _ = load_model(self.path().parent, ModelSettings(), "onnx")
        try:
            return default_signature(model)
        finally:
            model.close()

    def _folder_model(self, folder: Path) -> Path:
        return find_model_file(
            folder, ("model.onnx", "*.onnx"), self._source.settings.options("onnx").get("file")
        )


def _make(
    source: Source, recipe: _Recipe, folder: Path, base: _OnnxBase, calibration: Calibration
) -> Variant:
    """Make the variant in a hidden folder beside ``folder``, then put it in ``folder``'s place:
    a variant made before stays whole until the new one is (an interrupted run keeps it)."""
    staging = folder.with_name(f".{folder.name}.inferd-{os.getpid()}")
    try:
        made = _make_in(source, recipe, staging, base, calibration)
        if made.ok or folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            if folder.exists():
                folder.rename(old)
            if made.ok:
                staging.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        return Variant(made.name, folder, made.error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_in(
    source: Source, recipe: _Recipe, folder: Path, base: _OnnxBase, calibration: Calibration
) -> Variant:
    started = time.monotonic()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        # Converters print progress (Keras' export, torch.onnx): keep it off the report.
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            parameters = _build(source, recipe, folder / recipe.file, base, calibration)
        log.debug("%s: %s", recipe.name, printed.getvalue())
        check = check_variant(source, folder, calibration, recipe.tolerance)
    except Exception as exc:  # any converter or tool may fail; the other variants go on
        shutil.rmtree(folder, ignore_errors=True)
        return Variant(recipe.name, folder, _describe(exc))
    record = {
        "name": recipe.name,
        "source": str(source.path.resolve()),
        "method": recipe.method,
        "parameters": parameters,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "size_bytes": folder_bytes(folder),
        "tool_versions": _versions(recipe.family, source.runtime),
        "seconds": round(time.monotonic() - started, 3),
        "check": check,
    }
    (folder / "variant.json").write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
    return Variant(recipe.name, folder, None)


def _build(
    source: Source, recipe: _Recipe, target: Path, base: _OnnxBase, calibration: Calibration
) -> dict[str, Any]:
    if recipe.family == "tflite":
        mode = {"tflite": "float", "tflite-int8-dynamic": "dynamic", "tflite-int8": "int8"}[recipe.name]
        rows = calibration.rows(source.signature) if recipe.calibrated else None
        return to_tflite(source, target, mode, rows)
    start = base.path()
    if recipe.name == "onnx":
        shutil.copyfile(start, target)
        return {**base.parameters, "source_runtime": source.runtime}
    if recipe.name == "onnx-optimized":
        return onnx_variants.optimize_graph(start, target)
    if recipe.name == "onnx-int8-dynamic":
        return onnx_variants.quantize_dynamic(start, target)
    if recipe.name == "onnx-fp16":
        return onnx_variants.to_float16(start, target)
    if recipe.name == "onnx-mapped":
        return onnx_variants.external_weights(start, target)
    return onnx_variants.quantize_static(start, target, calibration.rows(base.signature()))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, InferdError):
        return exc.message
    if isinstance(exc, Unsupported):
        return str(exc)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}"


def _versions(family: str, runtime: str) -> dict[str, str]:
    if family == "tflite":
        packages: tuple[str, ...] = ("tensorflow", "tensorflow-cpu", "keras", "ai-edge-litert")
    else:
        packages = ("onnx", "onnxruntime", *_CONVERTERS.get(runtime, ()))
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found
