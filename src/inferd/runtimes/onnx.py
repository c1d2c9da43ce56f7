"""ONNX models through onnxruntime: the reference runtime.

``device = "cuda:N"`` runs the session on onnxruntime's CUDA provider (onnxruntime-gpu).

Options (``[onnx]`` in inferd.toml):
    file: the ``.onnx`` file when the folder holds several.
    intra_op_num_threads: threads inside one operator (default 1: inferd runs several requests
        at once on its own thread pool, so one thread per call uses the cores without fighting).
    inter_op_num_threads: threads across independent operators (default 1).
    execution_mode: ``sequential`` (default) or ``parallel``.
    graph_optimization_level: ``disable``, ``basic``, ``extended`` or ``all`` (default).
    allow_spinning: let idle intra-op threads spin (default false: spinning burns a core that
        other requests could use).
    share_weights: compute from onnxruntime's read-only mapping of the weights (default false):
        prepacking off, external data mapped, and a model whose weights are inside its ``.onnx``
        file served from a mapped copy written at its first load (``onnx_mapped``; ``cpu`` only).
    load_nice: build the session (read, parse and copy the file: about 2 ms per MB) in a thread
        of its own at this much lower CPU priority (Linux nice, 1 to 19; default 0: the load
        thread's own), so that a cold load takes the CPU that requests to loaded models leave.
        Needs one intra-op and one inter-op thread on ``cpu``: the threads onnxruntime starts for a
        session during its build would inherit the priority (Linux gives a new thread its
        creator's nice value) and keep it while serving. On a busy machine a niced load can wait
        long (past ``--load_wait_ms``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument, ModelLoadError
from inferd.model_cache import derived_dir
from inferd.priority import lower_this_thread
from inferd.runtimes import onnx_mapped
from inferd.runtimes.runtime import check_options, cuda_index, find_model_file, int_option
from inferd.types import DEFAULT_SIGNATURE, Signature, Tensors, TensorSpec

_OPTIONS = {
    "file",
    "intra_op_num_threads",
    "inter_op_num_threads",
    "execution_mode",
    "graph_optimization_level",
    "allow_spinning",
    "share_weights",
    "load_nice",
}

log = logging.getLogger(__name__)

_ONNX_TYPES = {
    "float": np.float32,
    "double": np.float64,
    "float16": np.float16,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
    "string": object,
}


class OnnxModel:
    """An onnxruntime session. ``InferenceSession.run`` is thread-safe."""

    def __init__(self, session: Any, signature: Signature) -> None:
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalid

        self._session = session
        self._signatures = {DEFAULT_SIGNATURE: signature}
        self._output_names = [spec.name for spec in signature.outputs]
        self._rejections = (OrtInvalid, Fail)

    @property
    def signatures(self) -> Mapping[str, Signature]:
        return self._signatures

    def predict(self, signature_name: str, inputs: Tensors) -> Tensors:
        feed = {k: _as_text(k, v) if v.dtype.kind == "O" else v for k, v in inputs.items()}
        try:
            results = self._session.run(self._output_names, feed)
        except self._rejections as exc:
            raise InvalidArgument(f"onnxruntime rejected the input: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        self._session = None


def _as_text(name: str, value: np.ndarray) -> np.ndarray:
    """A BYTES input as onnxruntime's strings: bytes decoded as UTF-8 (onnxruntime would store
    ``str(b"x")``, i.e. ``"b'x'"``); other inputs as they are.

    Raises:
        InvalidArgument: an element is not UTF-8, which an ONNX string cannot hold.
    """
    if value.dtype != object or not any(isinstance(item, bytes) for item in value.flat):
        return value
    try:
        return np.vectorize(_decode, otypes=[object])(value) if value.size else value
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"input {name!r}: ONNX string tensors hold UTF-8 text; an element is not"
        ) from None


def _decode(item: object) -> object:
    return item.decode() if isinstance(item, bytes) else item


class OnnxRuntime:
    name = "onnx"
    gpu = True

    def load(self, version_dir: Path, settings: ModelSettings) -> OnnxModel:
        import onnxruntime as ort

        options = settings.options(self.name)
        check_options(self.name, options, _OPTIONS)
        path = find_model_file(version_dir, ("model.onnx", "*.onnx"), options.get("file"))
        session_options = _session_options(ort, options)
        providers = _providers(ort, settings.device)
        nice = _load_nice(options, settings.device, session_options)
        mapped = None
        if options.get("share_weights") is True and settings.device == "cpu":
            mapped = _mapped_copy(ort, path, derived_dir(settings.cache_dir), session_options, nice)
        try:
            if mapped is not None:
                try:
                    session = _build(ort, str(mapped), session_options, providers, nice)
                except Exception as exc:  # a damaged copy: removed, and the model itself served
                    log.warning("%s: its mapped copy %s does not load (%s); removed", path, mapped, exc)
                    onnx_mapped.forget(path, derived_dir(settings.cache_dir))
                    mapped = None
            if mapped is None:
                session = _build(ort, str(path), session_options, providers, nice)
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise ModelLoadError(f"onnxruntime could not load {path.name}: {exc}") from exc
        if settings.device != "cpu" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise ModelLoadError(f"onnxruntime could not start its CUDA provider on {settings.device}")
        args = (*session.get_inputs(), *session.get_outputs())
        unranked = _unranked(path, {arg.name for arg in args if not arg.shape})
        signature = Signature(
            DEFAULT_SIGNATURE,
            tuple(_spec(arg, "input", unranked) for arg in session.get_inputs()),
            tuple(_spec(arg, "output", unranked) for arg in session.get_outputs()),
        )
        return OnnxModel(session, signature)


def _unranked(path: Path, shapeless: set[str]) -> frozenset[str]:
    """Those of the inputs and outputs ``shapeless`` (which onnxruntime shows with shape ``[]``,
    as it shows a scalar) whose type in the graph of ``path`` declares no shape: their rank is
    unknown, and a request may send any. Read with the ``onnx`` package, only when some are
    shapeless; without it they stay scalars (logged)."""
    if not shapeless:
        return frozenset()
    try:
        import onnx
    except ImportError:
        log.warning(
            "%s: %s declared with shape [] are served as scalars; install onnx to tell an unknown "
            "rank from a scalar",
            path,
            sorted(shapeless),
        )
        return frozenset()
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnxruntime read it; a parser that cannot changes nothing
        log.warning(
            "%s: the graph's shapes could not be read (%s); %s served as scalars",
            path,
            exc,
            sorted(shapeless),
        )
        return frozenset()
    return frozenset(
        value.name
        for value in (*graph.input, *graph.output)
        if value.name in shapeless and not value.type.tensor_type.HasField("shape")
    )


def maps_weights(version_dir: Path, settings: ModelSettings) -> bool:
    """Whether a load of ``version_dir`` would build its session from a mapped copy already
    written (``onnx_mapped``); False when its model file cannot be found."""
    options = settings.options("onnx")
    if options.get("share_weights") is not True or settings.device != "cpu":
        return False
    try:
        path = find_model_file(version_dir, ("model.onnx", "*.onnx"), options.get("file"))
    except ModelLoadError:
        return False
    return onnx_mapped.copy_of(path, derived_dir(settings.cache_dir)) is not None


def _mapped_copy(ort: Any, path: Path, cache: Path, session_options: Any, nice: int) -> Path | None:
    """The mapped copy of ``path``, written now if there is none; None for a file too small to
    be worth one, or when the copy cannot be written (logged: the model is then parsed)."""
    try:
        if path.stat().st_size < onnx_mapped.MIN_FILE_BYTES:
            return None
        copy = onnx_mapped.copy_of(path, cache)
        if copy is not None:
            return copy
        levels = ort.GraphOptimizationLevel
        keep = session_options.graph_optimization_level == levels.ORT_DISABLE_ALL
        level = levels.ORT_DISABLE_ALL if keep else levels.ORT_ENABLE_BASIC

        def build(model: str, options: Any) -> Any:
            return _build(ort, model, options, ["CPUExecutionProvider"], nice)

        copy = onnx_mapped.write_copy(ort, path, cache, level, build)
    except Exception as exc:  # OSError, or onnxruntime's own errors: the load itself will say
        log.warning(
            "%s: weights not mapped (no copy written to %s: %s); parsed at each load", path, cache, exc
        )
        return None
    log.info("%s: weights written as external data to %s, mapped from now on", path, copy.parent)
    return copy


def _load_nice(options: Mapping[str, Any], device: str, session_options: Any) -> int:
    """The ``load_nice`` option, checked (see the module docstring).

    Raises:
        ModelLoadError: not 0 to 19, or set for a session that starts threads of its own.
    """
    nice = int_option("onnx", options, "load_nice", 0)
    if nice > 19:
        raise ModelLoadError(f"[onnx] load_nice must be 0 to 19, got {nice}")
    threads = (session_options.intra_op_num_threads, session_options.inter_op_num_threads)
    if nice and (device != "cpu" or threads != (1, 1)):
        raise ModelLoadError(
            "[onnx] load_nice needs device = cpu and intra_op_num_threads = inter_op_num_threads = 1 "
            f"(the session's own threads would keep the lower priority), got {device} and {threads}"
        )
    return nice


def _build(ort: Any, path: str, session_options: Any, providers: list[Any], nice: int) -> Any:
    """``ort.InferenceSession(path)``; with ``nice`` > 0, built in a thread of its own at that
    much lower priority (see ``load_nice`` in the module docstring).

    Raises:
        Exception: whatever onnxruntime raised.
    """
    if nice <= 0 or not hasattr(os, "setpriority"):
        return ort.InferenceSession(path, sess_options=session_options, providers=providers)
    built: list[Any] = []
    failed: list[BaseException] = []

    def build() -> None:
        lower_this_thread(nice)  # where it cannot, the build runs at the usual priority
        try:
            built.append(ort.InferenceSession(path, sess_options=session_options, providers=providers))
        except BaseException as exc:  # re-raised in the load thread
            failed.append(exc)

    thread = threading.Thread(target=build, name="inferd-onnx-build")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return built[0]


def _providers(ort: Any, device: str) -> list[Any]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ModelLoadError(
            f"device {device!r} asks for CUDA, but this onnxruntime has only {available}; "
            "install onnxruntime-gpu on a machine with a CUDA GPU"
        )
    return [("CUDAExecutionProvider", {"device_id": cuda_index(device)}), "CPUExecutionProvider"]


def _session_options(ort: Any, options: Mapping[str, Any]) -> Any:
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    modes = {
        "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
        "parallel": ort.ExecutionMode.ORT_PARALLEL,
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = int_option("onnx", options, "intra_op_num_threads", 1)
    so.inter_op_num_threads = int_option("onnx", options, "inter_op_num_threads", 1)
    so.execution_mode = _choice(options, "execution_mode", modes, "sequential")
    so.graph_optimization_level = _choice(options, "graph_optimization_level", levels, "all")
    spinning = options.get("allow_spinning", False)
    if not isinstance(spinning, bool):
        raise ModelLoadError(f"[onnx] allow_spinning must be true or false, got {spinning!r}")
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    share = options.get("share_weights", False)
    if not isinstance(share, bool):
        raise ModelLoadError(f"[onnx] share_weights must be true or false, got {share!r}")
    if share:  # weights stored as external data stay in onnxruntime's read-only mapping of the file
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


def _choice(options: Mapping[str, Any], key: str, choices: Mapping[str, Any], default: str) -> Any:
    value = options.get(key, default)
    if value not in choices:
        raise ModelLoadError(f"[onnx] {key} must be one of {sorted(choices)}, got {value!r}")
    return choices[value]


def _spec(arg: Any, kind: str, unranked: frozenset[str] = frozenset()) -> TensorSpec:
    """A session's input or output; ``unranked``: the names whose rank is unknown."""
    type_name: str = arg.type
    if not type_name.startswith("tensor("):
        raise ModelLoadError(
            f"{kind} {arg.name!r} has type {type_name}; only tensors can be served "
            "(for skl2onnx classifiers, convert with options={'zipmap': False})"
        )
    element = type_name[len("tensor(") : -1]
    if element not in _ONNX_TYPES:
        raise ModelLoadError(f"{kind} {arg.name!r} has element type {element}, which inferd cannot serve")
    shape = (
        None if arg.name in unranked else tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    )
    return TensorSpec(arg.name, np.dtype(_ONNX_TYPES[element]), shape)


RUNTIME = OnnxRuntime()
