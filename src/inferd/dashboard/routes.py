"""The dashboard: a page served at ``/`` on the REST port, and the small JSON routes it reads.

The page (``static/``: plain HTML, JavaScript and CSS, no CDN, no build step) is the same for
every install and holds no server data, so it is served to anyone; everything it shows comes from
the routes below, which the HTTP app guards like any other call (``--api_token``), and the label
move needs the admin token. Routes:

- ``GET /dashboard/api/models``: every configured model, its versions (state, load error), labels,
  traffic split (version -> percent), its last rollout (``Rollouts.status``, or null), each
  version's ``resident_bytes`` (charged to it while loaded; 0 when not loaded, e.g. cold under a
  memory budget) and, for a served model, the inputs and outputs of its signatures.
- ``GET /dashboard/api/metrics``: cumulative counts read from inferd's Prometheus collector
  (requests by status, per-stage latency and batch-size bucket counts, rows queued, requests in
  flight) and the server process's resident memory; the page turns two readings into
  rates and windowed percentiles, so the server keeps no state per viewer.
- ``POST /dashboard/api/models/M/labels/L`` with ``{"version": N}``: move a label (admin).
- ``POST /dashboard/api/models/M/rollout`` with a rollout's body starts one, and
  ``POST /dashboard/api/models/M/rollout/ACTION`` pauses, resumes, promotes or aborts it (admin):
  ``Rollouts.command``, the code behind the admin routes that ``inferd rollout`` calls.

Load and unload use the V2 repository routes (``/v2/repository/models/M/load``).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Coroutine
from importlib import resources
from typing import Any

import orjson

from inferd.control import ModelControl
from inferd.errors import InferdError, InvalidArgument, NotFound
from inferd.metrics import Metrics
from inferd.protocols.rest_status import JSON_HEADERS, Response, json_error
from inferd.rollout import Rollouts
from inferd.service import InferenceService
from inferd.types import ModelRef, Signature, TensorSpec, VersionState, dtype_of

PREFIX = "/dashboard/"
API_PREFIX = "/dashboard/api/"
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_LABEL_ROUTE = re.compile(r"/dashboard/api/models/([^/]+)/labels/([^/]+)")
_ROLLOUT_ROUTE = re.compile(r"/dashboard/api/models/([^/]+)/rollout(?:/([a-z]+))?")
# The page may only talk to its own origin: no CDN, no beacon, no inline script.
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


def is_public(method: str, path: str) -> bool:
    """True for the page's static files, which carry no server data and need no token."""
    return method == "GET" and (path == "/" or (path.startswith(PREFIX) and not path.startswith(API_PREFIX)))


def is_admin(method: str, path: str) -> bool:
    """True for the dashboard calls that change what is served (they need the admin token)."""
    return method != "GET" and path.startswith(API_PREFIX)


def _static(name: str) -> Response:
    suffix = name[name.rfind(".") :] if "." in name else ""
    if not re.fullmatch(r"[a-z0-9_-]+\.[a-z]+", name) or suffix not in _STATIC_TYPES:
        raise NotFound(f"no dashboard file {name!r}")
    try:
        body = resources.files(__package__).joinpath("static", name).read_bytes()
    except (FileNotFoundError, OSError):
        raise NotFound(f"no dashboard file {name!r}") from None
    return 200, {"content-type": _STATIC_TYPES[suffix], **_PAGE_HEADERS}, body


class Dashboard:
    """Answers ``/`` and ``/dashboard/...``; tokens are checked by the caller first."""

    def __init__(
        self,
        service: InferenceService,
        control: ModelControl,
        metrics: Metrics,
        rollouts: Rollouts | None = None,
    ) -> None:
        self._service = service
        self._control = control
        self._metrics = metrics
        self._rollouts = rollouts

    def handle(self, method: str, path: str, body: bytes) -> Coroutine[Any, Any, Response] | None:
        """The answer for a dashboard path, to await; None when ``path`` is not one."""
        if path != "/" and not path.startswith(PREFIX):
            return None
        return self._answer(method, path, body)

    async def _answer(self, method: str, path: str, body: bytes) -> Response:
        try:
            if method == "GET" and path == "/":
                return _static("index.html")
            if method == "GET" and path == API_PREFIX + "models":
                return 200, dict(JSON_HEADERS), orjson.dumps(await self.models())
            if method == "GET" and path == API_PREFIX + "metrics":
                return 200, dict(JSON_HEADERS), orjson.dumps(self.readings())
            match = _LABEL_ROUTE.fullmatch(path)
            if method == "POST" and match:
                name, label = match.groups()
                if not re.fullmatch(r"[a-zA-Z0-9_]+", label):
                    raise InvalidArgument(f"label: expected letters, digits and _ only; got {label!r}")
                await self._control.move_label(name, label, _version_of(body))
                return 200, dict(JSON_HEADERS), orjson.dumps({"name": name, "labels": self._labels(name)})
            match = _ROLLOUT_ROUTE.fullmatch(path)
            if method == "POST" and match:
                if self._rollouts is None:
                    raise NotFound("this dashboard serves no rollouts")
                name, action = match.groups()
                status = await self._rollouts.command(name, action or "start", body)
                return 200, dict(JSON_HEADERS), orjson.dumps(status)
            if method == "GET" and path.startswith(PREFIX + "static/"):
                return _static(path[len(PREFIX + "static/") :])
            raise NotFound(f"no dashboard route {method} {path}")
        except InferdError as error:
            return json_error(error)

    def _labels(self, name: str) -> dict[str, int]:
        return self._control.labels(name)

    async def models(self) -> list[dict[str, Any]]:
        """One row per configured model: versions with state, error and resident bytes, labels,
        split, rollout, signatures."""
        rows: dict[str, dict[str, Any]] = {}
        resident, _ = self._control.residency()
        for entry in self._control.index():
            row = rows.setdefault(
                entry.name,
                {"name": entry.name, "unloaded": False, "versions": [], "labels": {}, "signatures": {}},
            )
            if entry.state is None:
                row["unloaded"] = True
                continue
            version = int(entry.version)
            row["versions"].append(
                {
                    "version": version,
                    "state": entry.state.name,
                    "reason": entry.reason,
                    "resident_bytes": resident.get((entry.name, version), 0),
                }
            )
        for name, row in rows.items():
            row["labels"] = self._labels(name)
            row["split"] = self._control.split(name)
            row["rollout"] = None
            if self._rollouts is not None:
                with contextlib.suppress(NotFound):
                    row["rollout"] = await self._rollouts.status(name)
            if any(v["state"] == VersionState.AVAILABLE.name for v in row["versions"]):
                try:
                    metadata = self._service.metadata(ModelRef(name))
                except InferdError:
                    continue
                row["platform"] = metadata.platform
                row["signatures"] = {key: _signature(sig) for key, sig in metadata.signatures.items()}
        return list(rows.values())

    def readings(self) -> dict[str, Any]:
        """Cumulative counts from the metrics collector, summed over models, versions and
        protocols; ``time`` is Unix seconds, latency bounds seconds, ``memory_bytes`` the resident
        memory of the server process (model worker processes not included), ``budgets`` each
        device's bytes charged to loaded versions and its budget (``--memory_budget``; None:
        none)."""
        requests: dict[str, float] = {}
        stages: dict[str, list[float]] = {}
        batches: list[float] = []
        latency_bounds: list[float] = []
        batch_bounds: list[float] = []
        gauges: dict[str, float] = {}
        for family in self._metrics.collect():  # inferd's own families; not the process collector
            for sample in family.samples:
                labels, value = sample.labels, sample.value
                if sample.name == "inferd_requests_total":
                    requests[labels["status"]] = requests.get(labels["status"], 0) + value
                elif sample.name == "inferd_request_duration_seconds_bucket":
                    counts = stages.setdefault(labels["stage"], [])
                    _add_bucket(counts, latency_bounds, labels["le"], value)
                elif sample.name == "inferd_batch_size_bucket":
                    _add_bucket(batches, batch_bounds, labels["le"], value)
                elif sample.name in (
                    "inferd_queue_rows",
                    "inferd_in_flight_requests",
                    "process_resident_memory_bytes",
                ):
                    gauges[sample.name] = gauges.get(sample.name, 0) + value
        _, budgets = self._control.residency()
        return {
            "time": time.time(),
            "budgets": budgets,
            "requests": requests,
            "latency_bounds_s": latency_bounds,
            "stages": stages,
            "batch_bounds": batch_bounds,
            "batch_sizes": batches,
            "queue_rows": gauges.get("inferd_queue_rows", 0),
            "in_flight": gauges.get("inferd_in_flight_requests", 0),
            "memory_bytes": _resident_bytes(),
        }


def _resident_bytes() -> int:
    """Resident memory of this process, from ``/proc/self/statm`` (0 where there is none)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _add_bucket(counts: list[float], bounds: list[float], le: str, value: float) -> None:
    """Add one cumulative bucket sample to ``counts``, indexed by its bound in ``bounds``
    (every label set of a family shares the same bounds, in the same order)."""
    bound = float(le)
    if bound not in bounds:
        bounds.append(bound)
    index = bounds.index(bound)
    while len(counts) <= index:
        counts.append(0.0)
    counts[index] += value


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": dtype_of(spec.dtype).v2,
        "shape": list(spec.shape) if spec.shape is not None else None,
    }


def _signature(signature: Signature) -> dict[str, Any]:
    return {
        "method": signature.method.value,
        "inputs": [_tensor(spec) for spec in signature.inputs],
        "outputs": [_tensor(spec) for spec in signature.outputs],
    }


def _version_of(body: bytes) -> int:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidArgument('the body must be JSON: {"version": <number>}') from None
    version = document.get("version") if isinstance(document, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InvalidArgument(
            f'version: expected a non-negative integer, as in {{"version": 1}}; got {version!r}'
        )
    return version
