"""Variants of an ONNX model made with onnxruntime's and onnx's tools: graph optimisation, dynamic
and static int8 quantisation, float16, and the weights saved as external data.

Each function reads ``base`` (an ``.onnx`` file), writes ``target``, and returns the parameters
to record. A quantisation or conversion that changes nothing (every operator of the model is one
the tool leaves alone, such as scikit-learn's ``LinearClassifier``) raises ``Unsupported``
rather than write a copy of the original under a new name.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inferd.optimize.convert import Unsupported
from inferd.types import Tensors

OPTIMIZATION_LEVEL = "extended"
"""onnxruntime's EXTENDED level: constant folding, redundant-node removal and fusions into
onnxruntime's own operators (FusedGemm, FusedConv, ...). The saved model runs on onnxruntime on
any CPU; ``all`` would add layout changes tied to the machine that saved it."""

CALIBRATION_BATCH_ROWS = 64


def optimize_graph(base: Path, target: Path) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(base), sess_options=options, providers=["CPUExecutionProvider"])
    return {"tool": "onnxruntime.SessionOptions.optimized_model_filepath", "level": OPTIMIZATION_LEVEL}


def quantize_dynamic(base: Path, target: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as quantize

    with _prepared(base) as prepared:
        quantize(str(prepared), str(target), weight_type=QuantType.QInt8, per_channel=False)
    _require_changed(target, _INT8, "int8 quantisation")
    return {
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "preprocessed": _PREPROCESSOR,
        "weight_type": "int8",
        "per_channel": False,
        "activations": "uint8, scaled per call at run time",
    }


def to_float16(base: Path, target: Path) -> dict[str, Any]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # onnxruntime's copy of the converter: onnxconverter-common 1.16 drops the Cast a graph input
    # feeds (as in every skl2onnx model) and writes a model that does not load.
    model = convert_float_to_float16(onnx.load(str(base)), keep_io_types=True)
    onnx.save(model, str(target))
    _require_changed(target, _FLOAT16, "float16 conversion")
    return {
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
        "keep_io_types": True,
        "note": "weights and arithmetic in float16; inputs and outputs stay float32 (casts at the edges)",
    }


EXTERNAL_DATA = "model.onnx.data"
"""The file beside ``model.onnx`` that the ``onnx-mapped`` variant keeps its weights in."""
EXTERNAL_MIN_BYTES = 1024
"""Initializers smaller than this stay in ``model.onnx`` (onnx's own default threshold)."""


def external_weights(base: Path, target: Path) -> dict[str, Any]:
    """The same graph and weights, with every initializer of at least ``EXTERNAL_MIN_BYTES`` in
    one ``EXTERNAL_DATA`` file beside ``target``: onnxruntime maps that file instead of copying
    the weights out of a parsed protobuf, which ``[onnx] share_weights = true`` keeps (cheap
    loads and unloads under a memory budget, one copy of the weights for all ``--workers``)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(base))
    for tensor in model.graph.initializer:  # onnx moves only raw_data out; converters may use *_data
        if not tensor.HasField("raw_data") and tensor.data_type != onnx.TensorProto.STRING:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA,
        size_threshold=EXTERNAL_MIN_BYTES,
    )
    saved = onnx.load(str(target), load_external_data=False).graph.initializer
    moved = sum(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in saved)
    if not moved:
        raise Unsupported(f"no weight of {EXTERNAL_MIN_BYTES} bytes or more to save apart")
    return {
        "tool": "onnx.save_model(save_as_external_data=True)",
        "location": EXTERNAL_DATA,
        "size_threshold_bytes": EXTERNAL_MIN_BYTES,
        "external_initializers": moved,
        "serve_with": "[onnx] share_weights = true",
    }


def quantize_static(base: Path, target: Path, rows: Tensors) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as quantize

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches: Iterator[Tensors] = _batches(rows)

        def get_next(self) -> Tensors | None:
            return next(self._batches, None)

    with _prepared(base) as prepared:
        quantize(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=False,
            calibrate_method=CalibrationMethod.MinMax,
        )
    _require_changed(target, _INT8, "int8 quantisation")
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "preprocessed": _PREPROCESSOR,
        "format": "QDQ",
        "activation_type": "int8",
        "weight_type": "int8",
        "per_channel": False,
        "calibration_method": "MinMax",
        "calibration_rows": len(next(iter(rows.values()))),
    }


_PREPROCESSOR = "onnxruntime.quantization.shape_inference.quant_pre_process(skip_symbolic_shape=True)"


@contextmanager
def _prepared(base: Path) -> Iterator[Path]:
    """``base`` after onnxruntime's pre-processing for quantisation (ONNX shape inference and
    graph optimisation), in a scratch folder that lasts as long as the context. Its symbolic
    shape inference is skipped: it stops at operators it does not know, such as scikit-learn's."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="inferd-quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(base), str(prepared), skip_symbolic_shape=True)
        yield prepared


def _batches(rows: Tensors) -> Iterator[Tensors]:
    count = len(next(iter(rows.values())))
    for start in range(0, count, CALIBRATION_BATCH_ROWS):
        yield {name: value[start : start + CALIBRATION_BATCH_ROWS] for name, value in rows.items()}


_INT8 = (2, 3)
"""onnx.TensorProto UINT8 and INT8."""
_FLOAT16 = (10,)
"""onnx.TensorProto FLOAT16."""


def _require_changed(path: Path, element_types: tuple[int, ...], what: str) -> None:
    """Refuse a result in which no weight took one of ``element_types``, naming the operators."""
    import onnx

    model = onnx.load(str(path))
    if any(init.data_type in element_types for init in model.graph.initializer):
        return
    ops = sorted({node.op_type for node in model.graph.node})
    raise Unsupported(f"{what} changed no operator of this model (it has {', '.join(ops)})")
