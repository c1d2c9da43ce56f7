"""Residency: which model versions stay loaded when memory is bounded per device.

``--memory_budget`` gives each device (``cpu`` for host memory, ``cuda:N`` for a GPU) a number
of bytes that loaded versions may hold. A version is charged, per device:

- while it loads, its *reservation*: the larger of its footprint (below) and its size on disk
  times the runtime's load factor (``LOAD_FACTORS``: the peak a load reaches, e.g. an ONNX file
  parsed and then copied into the session), so that concurrent loads cannot overshoot;
- once loaded, its *footprint*: what the load measurably added on its device (``devices``:
  resident memory for the host, the framework's allocator for a GPU), never less than its size
  on disk; before the first load of a version, the size on disk times the runtime's resident
  factor. The last measured footprint of each version is remembered (``Footprints``), so a
  reload charges what the version really took.

The charge of an unloaded version is released when its servable is closed (after its last
lease), not when it is chosen, so the budget counts memory that is really still held.

Which loaded versions make room is chosen by ``GreedyDualSizeFrequency``: each version's
priority is ``clock + hits * load_seconds / size_MiB`` (GDSF, Cherkasova 1998); the lowest
goes first, and the clock rises to the priority of each version evicted, so that versions not
used for a long time age out whatever their score once was. ``LeastRecentlyUsed`` is the same
interface with priority = last use, the baseline the benchmark compares against.

Everything here is pure bookkeeping, called from the event loop's thread (the manager's); it
never loads or closes anything.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from inferd.errors import ConfigError
from inferd.metrics import Histogram
from inferd.types import ModelId

HOST = "cpu"
"""The device name of host memory in budgets and metrics."""

MAPPED_ONNX = "onnx-mapped"
"""The factors' key for an ONNX version served with ``[onnx] share_weights`` whose weights are
external data (``mapped_weights``): onnxruntime maps them instead of parsing and copying them."""

LOAD_FACTORS = {
    "onnx": 3.0,
    MAPPED_ONNX: 1.0,
    "tflite": 1.5,
    "torch": 2.0,
    "tensorflow": 3.0,
    "sklearn": 3.0,
    "xgboost": 3.0,
    "lightgbm": 3.0,
    "python": 2.0,
}
"""Peak memory while loading, per byte on disk, by runtime (2.0 for one not listed). ONNX's is
measured (onnxruntime 1.2x: the file read, its parsed protobuf and the session's own copy of the
initializers, 2.7x the file at the peak); so is mapped ONNX's (a load adds nothing but onnxruntime's
graph, and a call that reads every weight pages in 1.0x the data file); the others are not yet,
and are set high."""

RESIDENT_FACTORS = {"onnx": 1.2, MAPPED_ONNX: 1.0, "tflite": 1.2, "torch": 1.2, "tensorflow": 2.0}
"""Memory held once loaded, per byte on disk, before a version was ever measured (1.5 else)."""

RESIDENT_OVERHEAD = {"onnx": 256 * 1024, MAPPED_ONNX: 256 * 1024}
"""Bytes a loaded version holds whatever its size, by runtime (0 for one not listed): an
onnxruntime session and inferd's servable around it take about 0.2 MiB (measured)."""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_DEVICE = re.compile(r"cpu|cuda:\d+")

CauseT = str
LOAD_CAUSES = ("start", "cold", "reload")
"""``start``: loaded by a repository scan (at start, a new version, a pinned model); ``cold``:
first loaded by a request; ``reload``: loaded by a request again after it was unloaded."""

EVICTION_REASONS = ("budget", "idle")

COLD_START_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def parse_size(text: str) -> int:
    """Bytes of ``8GiB``, ``512MiB``, ``1.5GB``, ``1000000`` (decimal and binary units).

    Raises:
        ConfigError: not a number with a known unit.
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(f"--memory_budget: expected a size such as 8GiB or 512MB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def parse_budgets(values: Iterable[str]) -> dict[str, int]:
    """``--memory_budget`` values -> bytes by device: ``8GiB`` is host memory (``cpu``),
    ``cuda:0=20GiB`` one GPU's. A device given twice keeps its last value.

    Raises:
        ConfigError: a bad device name or size, or a size of zero.
    """
    budgets: dict[str, int] = {}
    for value in values:
        device, _, size = value.rpartition("=")
        device = device.strip() or HOST
        if device == "cuda":
            device = "cuda:0"
        if not _DEVICE.fullmatch(device):
            raise ConfigError(f'--memory_budget: expected "SIZE" or "cuda:N=SIZE", got {value!r}')
        budgets[device] = parse_size(size)
        if budgets[device] <= 0:
            raise ConfigError(f"--memory_budget: the budget of {device} must be more than 0, got {value!r}")
    return budgets


def format_bytes(n: float) -> str:
    """``n`` bytes for people: ``12.3 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def disk_bytes(version_dir: Path) -> int:
    """Bytes of the regular files under ``version_dir`` (0 when it cannot be read)."""
    total = 0
    try:
        for path in version_dir.rglob("*"):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    except OSError:
        pass
    return total


MAPPED_SHARE = 0.9
"""The least share of a version's bytes outside its ``.onnx`` files for ``mapped_weights``."""


def mapped_weights(version_dir: Path, on_disk: int) -> bool:
    """Whether at least ``MAPPED_SHARE`` of a version's ``on_disk`` bytes are outside its
    ``.onnx`` files: external data, which onnxruntime maps when prepacking is off (``[onnx]
    share_weights``). A version with more of its weights inside ``.onnx`` files keeps the parsing
    load factor (the safe side)."""
    try:
        graphs = sum(p.stat().st_size for p in version_dir.rglob("*.onnx") if p.is_file())
    except OSError:
        return False
    return on_disk > 0 and on_disk - graphs >= MAPPED_SHARE * on_disk


def runtime_guess(version_dir: Path, runtime: str | None) -> str:
    """The runtime named by config, else one guessed from file suffixes (for the factors only)."""
    if runtime:
        return runtime
    for suffix, name in ((".onnx", "onnx"), (".tflite", "tflite"), (".pt", "torch"), (".pb", "tensorflow")):
        if any(version_dir.glob(f"*{suffix}")):
            return name
    return ""


class Footprints:
    """The last measured footprint of each version, by ``ModelId``, and estimates before one."""

    def __init__(self) -> None:
        self._measured: dict[ModelId, int] = {}

    def known(self, id: ModelId) -> bool:
        """True once ``id`` was loaded and measured."""
        return id in self._measured

    def learn(self, id: ModelId, nbytes: int) -> None:
        self._measured[id] = nbytes

    def footprint(self, id: ModelId, on_disk: int, runtime: str) -> int:
        """What ``id`` will hold once loaded: measured, or estimated from ``on_disk`` bytes."""
        measured = self._measured.get(id)
        if measured is not None:
            return measured
        return int(on_disk * RESIDENT_FACTORS.get(runtime, 1.5)) + RESIDENT_OVERHEAD.get(runtime, 0)

    def reservation(self, id: ModelId, on_disk: int, runtime: str) -> int:
        """What loading ``id`` may take at its peak: see the module docstring."""
        peak = int(on_disk * LOAD_FACTORS.get(runtime, 2.0)) + RESIDENT_OVERHEAD.get(runtime, 0)
        return max(self.footprint(id, on_disk, runtime), peak)


K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Score:
    size: int
    cost_s: float
    hits: int = 0
    priority: float = 0.0


class GreedyDualSizeFrequency(Generic[K]):
    """GDSF: evict the lowest ``clock + hits * cost_s / size_MiB``; see the module docstring.

    ``admit`` a key when it is loaded (its size in bytes and its load time in seconds), ``hit`` it
    on each use, ``forget`` it when unloaded; ``victims`` names which to unload for ``need`` bytes.
    """

    def __init__(self) -> None:
        self.clock = 0.0
        self._scores: dict[K, _Score] = {}

    def admit(self, key: K, size: int, cost_s: float) -> None:
        self._scores[key] = _Score(max(size, 1), max(cost_s, 1e-6))
        self.hit(key)

    def hit(self, key: K) -> None:
        score = self._scores.get(key)
        if score is not None:
            score.hits += 1
            score.priority = self.clock + score.hits * score.cost_s / (score.size / 2**20)

    def forget(self, key: K) -> None:
        self._scores.pop(key, None)

    def order(self, keys: Iterable[K]) -> list[K]:
        """``keys`` (admitted ones) from first to last to evict."""
        return sorted((k for k in keys if k in self._scores), key=lambda k: self._scores[k].priority)

    def victims(self, keys: Iterable[K], sizes: Mapping[K, int], need: int) -> list[K]:
        """The fewest of ``keys``, in eviction order, whose ``sizes`` sum to ``need`` bytes (all
        of them when they do not); the clock rises to the last one's priority."""
        chosen: list[K] = []
        freed = 0
        for key in self.order(keys):
            if freed >= need:
                break
            chosen.append(key)
            freed += sizes[key]
            self.clock = max(self.clock, self._scores[key].priority)
        return chosen


class LeastRecentlyUsed(Generic[K]):
    """LRU with ``GreedyDualSizeFrequency``'s interface: the baseline to beat."""

    def __init__(self) -> None:
        self._tick = 0
        self._used: dict[K, int] = {}

    def admit(self, key: K, size: int, cost_s: float) -> None:
        self.hit(key)

    def hit(self, key: K) -> None:
        self._tick += 1
        self._used[key] = self._tick

    def forget(self, key: K) -> None:
        self._used.pop(key, None)

    def order(self, keys: Iterable[K]) -> list[K]:
        return sorted((k for k in keys if k in self._used), key=lambda k: self._used[k])

    def victims(self, keys: Iterable[K], sizes: Mapping[K, int], need: int) -> list[K]:
        chosen: list[K] = []
        freed = 0
        for key in self.order(keys):
            if freed >= need:
                break
            chosen.append(key)
            freed += sizes[key]
        return chosen


@dataclass(slots=True)
class _Charge:
    device: str
    nbytes: int
    freeing: bool = False


class MemoryBudget(Generic[K]):
    """Bytes charged per device against its budget (no budget: counted, never limited).

    A key holds one charge: ``charge`` sets it (a reservation, then the measured footprint),
    ``freeing`` marks it as on its way out (chosen for unloading, still held), ``release``
    drops it once the memory is really freed.
    """

    def __init__(self, budgets: Mapping[str, int]) -> None:
        self.budgets = dict(budgets)
        self._charges: dict[K, _Charge] = {}

    def limit(self, device: str) -> int | None:
        return self.budgets.get(device)

    def charge(self, key: K, device: str, nbytes: int) -> None:
        self._charges[key] = _Charge(device, max(nbytes, 0))

    def charged(self, key: K) -> int:
        charge = self._charges.get(key)
        return 0 if charge is None else charge.nbytes

    def mark_freeing(self, key: K) -> None:
        charge = self._charges.get(key)
        if charge is not None:
            charge.freeing = True

    def release(self, key: K) -> None:
        self._charges.pop(key, None)

    def used(self, device: str) -> int:
        """Bytes charged on ``device``, freeing ones included (they are still held)."""
        return sum(c.nbytes for c in self._charges.values() if c.device == device)

    def freeing(self, device: str) -> int:
        """Bytes on ``device`` already chosen to be freed."""
        return sum(c.nbytes for c in self._charges.values() if c.device == device and c.freeing)

    def free(self, device: str) -> int | None:
        """Bytes left on ``device``; None when it has no budget."""
        limit = self.budgets.get(device)
        return None if limit is None else limit - self.used(device)

    def devices(self) -> list[str]:
        """Devices with a budget or a charge."""
        return sorted(set(self.budgets) | {c.device for c in self._charges.values()})


@dataclass(slots=True)
class ResidencyStats:
    """Counts for ``/metrics``; recorded from the event loop's thread."""

    loads: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LOAD_CAUSES, 0))
    evictions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVICTION_REASONS, 0))
    cold_start: Histogram = field(default_factory=lambda: Histogram(COLD_START_BUCKETS_S))


class ResidencyCollector(Collector):
    """Exports ``ResidencyStats``, the budgets and each resident version's bytes.

    Args:
        stats: the counters.
        budget: the budgets and charges.
        resident: reads (model, version, bytes) of every loaded version at scrape time.
    """

    def __init__(
        self,
        stats: ResidencyStats,
        budget: MemoryBudget[Any],
        resident: Callable[[], Iterable[tuple[str, str, int]]],
    ) -> None:
        self._stats = stats
        self._budget = budget
        self._resident = resident

    def collect(self) -> Iterator[Any]:
        loads = CounterMetricFamily("inferd_model_loads", "Version loads by cause", labels=["cause"])
        for cause, count in list(self._stats.loads.items()):
            loads.add_metric([cause], count)
        yield loads
        evictions = CounterMetricFamily(
            "inferd_model_evictions", "Versions unloaded to make room or after idling", labels=["reason"]
        )
        for reason, count in list(self._stats.evictions.items()):
            evictions.add_metric([reason], count)
        yield evictions
        cold = HistogramMetricFamily(
            "inferd_cold_start_seconds",
            "From the arrival of the request that started a load to the loaded version's first answer",
        )
        hist = self._stats.cold_start
        cold.add_metric([], hist.buckets(), hist.total)
        yield cold
        resident = GaugeMetricFamily(
            "inferd_model_resident_bytes", "Bytes charged to each loaded version", labels=["model", "version"]
        )
        for model, version, nbytes in self._resident():
            resident.add_metric([model, version], nbytes)
        yield resident
        budget = GaugeMetricFamily(
            "inferd_memory_budget_bytes", "The --memory_budget of each device", labels=["device"]
        )
        used = GaugeMetricFamily(
            "inferd_memory_used_bytes",
            "Bytes charged on each device: loaded versions, loads in progress, and ones being freed",
            labels=["device"],
        )
        for device in self._budget.devices():
            limit = self._budget.limit(device)
            if limit is not None:
                budget.add_metric([device], limit)
            used.add_metric([device], self._budget.used(device))
        yield budget
        yield used


def now() -> float:
    """The clock of last uses and idle times (monotonic seconds)."""
    return time.monotonic()
