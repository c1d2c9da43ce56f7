"""PyTorch programs: ``torch.export`` archives (``*.pt2``) and TorchScript (``*.pt``, ``*.pth``).

An exported program knows its inputs' names, dtypes and shapes (dynamic dimensions are -1) and
its outputs' dtypes and shapes; its outputs are named ``output_0``, ``output_1``... TorchScript
knows only its inputs' names (the arguments of ``forward``) and how many tensors it returns, so
its inputs are FP32 of any shape unless ``[signature]`` in inferd.toml declares them.
``[signature]`` ``inputs`` or ``outputs``, when given, replace what the program tells, which also
names a dict's outputs (a ``forward`` returning ``Dict[str, Tensor]`` must declare them).

Options (``[torch]`` in inferd.toml):
    file: the program file when the folder holds several.
    num_threads: torch's intra-op threads (default 1). torch has one pool per process, so the
        value set by the model loaded last holds for all; 0 leaves torch's default.

``device = "cuda:N"`` loads the program onto that GPU; inputs are copied there and outputs back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from inferd.config import ModelSettings
from inferd.errors import InvalidArgument, ModelLoadError
from inferd.runtimes.runtime import (
    check_options,
    declared_specs,
    find_model_file,
    import_framework,
    int_option,
)
from inferd.types import DEFAULT_SIGNATURE, Signature, Tensors, TensorSpec

_OPTIONS = {"file", "num_threads"}
_FLOAT = np.dtype(np.float32)

_Loaded = tuple[Callable[..., Any], tuple[TensorSpec, ...], tuple[TensorSpec, ...] | None]
"""A loaded program, its inputs, and its outputs (None when the program cannot tell)."""


class TorchModel:
    """A loaded program, called under ``torch.inference_mode()``. Neither TorchScript modules nor
    exported programs change state when they run in inference mode, so several threads may call
    at once."""

    def __init__(self, torch: Any, program: Callable[..., Any], signature: Signature, device: str) -> None:
        self._torch = torch
        self._program: Callable[..., Any] | None = program
        self._signatures = {DEFAULT_SIGNATURE: signature}
        self._device = device

    @property
    def signatures(self) -> Mapping[str, Signature]:
        return self._signatures

    def predict(self, signature_name: str, inputs: Tensors) -> Tensors:
        torch, program = self._torch, self._program
        assert program is not None, "predict after close"
        signature = self._signatures[DEFAULT_SIGNATURE]
        args = [torch.from_numpy(inputs[spec.name]).to(self._device) for spec in signature.inputs]
        try:
            with torch.inference_mode():
                result = program(*args)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
            raise InvalidArgument(f"torch rejected the input: {type(exc).__name__}: {exc}") from exc
        names = [spec.name for spec in signature.outputs]
        if isinstance(result, Mapping):
            picked = {name: result[name] for name in names if name in result}
        else:
            values = [result] if isinstance(result, torch.Tensor) else list(result)
            picked = dict(zip(names, values, strict=False))
        return {name: value.detach().cpu().numpy() for name, value in picked.items()}

    def close(self) -> None:
        self._program = None


class TorchRuntime:
    name = "torch"
    gpu = True
    _load_lock = threading.Lock()
    """torch.export.load keeps its deserializer in a global: two loads at once collide."""

    def load(self, version_dir: Path, settings: ModelSettings) -> TorchModel:
        torch = import_framework("torch", "torch")
        options = settings.options(self.name)
        check_options(self.name, options, _OPTIONS)
        path = find_model_file(version_dir, ("*.pt2", "*.pt", "*.pth"), options.get("file"))
        threads = int_option(self.name, options, "num_threads", 1)
        if threads:
            torch.set_num_threads(threads)
        device = settings.device
        if device != "cpu" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asks for CUDA, but torch sees no CUDA GPU")
        try:
            with self._load_lock:
                if path.suffix == ".pt2":
                    program, inputs, outputs = _load_exported(torch, path, device)
                else:
                    program, inputs, outputs = _load_torchscript(torch, path, device)
        except ModelLoadError:
            raise
        except Exception as exc:  # torch raises RuntimeError, zipfile and pickle errors on bad files
            raise ModelLoadError(
                f"torch could not load {path.name}: {type(exc).__name__}: {exc} (serve TorchScript saved "
                "with torch.jit.save, or a torch.export program saved with torch.export.save as .pt2)"
            ) from exc
        where = f"{version_dir.parent / 'inferd.toml'} [signature]"
        declared_in = declared_specs(settings.signature, "inputs", where)
        declared_out = declared_specs(settings.signature, "outputs", where)
        if declared_out is None and outputs is None:
            raise ModelLoadError(
                f"{path.name}: forward() does not return a tensor or a tuple of tensors; "
                "declare its outputs in [signature] in inferd.toml"
            )
        signature = Signature(DEFAULT_SIGNATURE, declared_in or inputs, declared_out or outputs or ())
        return TorchModel(torch, program, signature, device)


def _load_exported(torch: Any, path: Path, device: str) -> _Loaded:
    program = torch.export.load(str(path))
    if device != "cpu":
        passes = import_framework("torch.export.passes", "torch")
        program = passes.move_to_device_pass(program, device)
    user_inputs = set(program.graph_signature.user_inputs)
    inputs, outputs = [], []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            inputs.append(_fake_spec(node.name, node.meta["val"]))
        elif node.op == "output":
            results = node.args[0]
            outputs = [_fake_spec(f"output_{i}", arg.meta["val"]) for i, arg in enumerate(results)]
    return program.module(), tuple(inputs), tuple(outputs)


def _fake_spec(name: str, value: Any) -> TensorSpec:
    """A TensorSpec from export's example value; symbolic (dynamic) dimensions become -1."""
    shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
    return TensorSpec(name, np.dtype(str(value.dtype).removeprefix("torch.")), shape)


def _load_torchscript(torch: Any, path: Path, device: str) -> _Loaded:
    module = torch.jit.load(str(path), map_location=device)
    module.eval()
    schema = module.forward.schema
    inputs = tuple(TensorSpec(arg.name, _FLOAT, None) for arg in schema.arguments[1:])
    returned = schema.returns[0].type if len(schema.returns) == 1 else None
    if isinstance(returned, torch.TensorType):
        count = 1
    elif isinstance(returned, torch.TupleType) and all(
        isinstance(t, torch.TensorType) for t in returned.elements()
    ):
        count = len(returned.elements())
    else:
        return module, inputs, None
    return module, inputs, tuple(TensorSpec(f"output_{i}", _FLOAT, None) for i in range(count))


RUNTIME = TorchRuntime()
