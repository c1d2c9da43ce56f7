"""One module per server under test. Each defines ``SERVER``, a :class:`Server`.

A server says which packages it needs (installed by name into ``bench/.venvs/<name>``), which
variants it has (``default`` and, where it batches adaptively, ``batching``), how to start it
for one model, and what a request looks like for it (path, body and headers). A variant may
change the wire: inferd's ``v2-json``, ``v2-binary`` and ``grpc`` variants are the same server
driven over KServe V2 JSON, V2 binary tensors and TF Serving's gRPC ``Predict``.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

# Batching settings used by every server that batches, so the "batching" rows compare like with
# like: at most 32 requests (or examples, where the server counts examples) per batch, waiting at
# most 2 ms for a batch to fill.
MAX_BATCH = 32
BATCH_WAIT_MS = 2


class Wire(Enum):
    """How the load generator talks to a server variant."""

    HTTP = "http"  # POST ``Launch.url`` with the variant's body and headers (wrk or inferd bench)
    GRPC = "grpc"  # TF Serving's gRPC Predict at ``Launch.grpc_target`` (inferd bench only)


@dataclass
class Launch:
    cmd: list[str]
    cwd: Path
    url: str  # the predict URL (answers checked and readiness probed here, whatever the wire)
    grpc_target: str | None = None  # host:port of its gRPC API, for Wire.GRPC variants
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 90.0
    # extra readiness check: () -> None when ready, or a message saying why it is not (yet)
    not_ready: Callable[[], str | None] | None = None
    cleanup: list[Path] = field(default_factory=list)  # removed once the server has stopped


@dataclass
class Context:
    root: Path  # repository root
    work: Path  # bench/.work/<run>/<server>-<variant>-<model>
    venv: Path  # the server's venv (the project's .venv for inferd)
    model: str  # digits or cnn
    model_repo: Path  # a repository with <model>/1/model.onnx
    model_file: Path
    variant: str


class Server(abc.ABC):
    name = ""
    packages: tuple[str, ...] = ()
    variants: tuple[str, ...] = ("default",)
    # variants a full run leaves out unless named (--only NAME:variant); --perf picks its own
    extra_variants: tuple[str, ...] = ()
    uses_project_venv = False
    # packages whose versions go into the report
    report_packages: tuple[str, ...] = ()

    @abc.abstractmethod
    def launch(self, ctx: Context, port: int) -> Launch:
        """The command that starts this server for ``ctx.model`` on ``port``."""

    def wire(self, variant: str) -> Wire:
        """How the load reaches ``variant``; HTTP unless overridden."""
        return Wire.HTTP

    def body(self, x: np.ndarray, variant: str) -> bytes:
        """The request for the examples ``x``; TF Serving's row format unless overridden."""
        return json.dumps({"instances": x.tolist()}).encode()

    def headers(self, x: np.ndarray, variant: str) -> dict[str, str]:
        """The request headers that go with ``body(x, variant)``."""
        return {"Content-Type": "application/json"}

    def predictions(self, answer: bytes, headers: dict[str, str], variant: str) -> np.ndarray:
        """The [N, 10] probabilities out of an answer (for the correctness check); ``headers``
        are the answer's, with lower-case names."""
        return np.asarray(json.loads(answer)["predictions"], dtype=np.float32)


def all_servers() -> dict[str, Server]:
    from . import (
        asgi_floor_srv,
        bentoml_srv,
        fastapi_srv,
        granian_floor_srv,
        inferd_srv,
        litserve_srv,
        mlserver_srv,
        rayserve_srv,
        torchserve_srv,
    )

    mods = (
        inferd_srv,
        granian_floor_srv,
        asgi_floor_srv,
        fastapi_srv,
        mlserver_srv,
        bentoml_srv,
        litserve_srv,
        rayserve_srv,
        torchserve_srv,
    )
    return {m.SERVER.name: m.SERVER for m in mods}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
