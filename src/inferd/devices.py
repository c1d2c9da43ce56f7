"""The device layer: how many bytes a device holds for this process now, and giving freed host
memory back to the OS. The residency accounting (``residency``, ``manager``) measures a load as
the difference of two readings; tests replace ``FrameworkMemory`` with a fake ``DeviceMemory``.

Readings, by device:

- ``cpu``: this process's resident set size (``/proc/self/statm``).
- ``cuda:N``: the sum over the GPU frameworks already imported in this process of what their
  allocators hold on device N: ``torch.cuda.memory_allocated(N)``, TensorFlow's
  ``tf.config.experimental.get_memory_info("GPU:N")["current"]``. onnxruntime publishes no
  per-session allocator reading in Python, so when neither framework is in use the reading is
  the device's used memory (total minus free) from ``torch.cuda.mem_get_info`` or NVML
  (``pynvml``), whichever is installed, which also counts other processes; 0 when none is (the
  version's estimate from its files is charged then).

Host memory a closed model freed goes back to the OS only if glibc lets it go: by default glibc
raises its mmap threshold to the size of each large block freed (up to 32 MiB), so the next
model's weights come from its per-thread heaps, where ``malloc_trim`` after an unload returned
too little (measured: 64 MB held by a quiet server beyond what its versions were charged, peak
RSS 17-36% over the budget). ``return_large_blocks`` fixes the threshold at 1 MiB under a
budget, so that weights and other large buffers are ``mmap``-ed and unmapped when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any, Protocol

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE")
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20
"""Blocks of this many bytes or more are mapped on their own and unmapped when freed (budget
only): model weights are; request tensors under 1 MiB keep glibc's faster heap."""


class DeviceMemory(Protocol):
    """Reads memory in use per device; ``used`` is called from load threads."""

    def used(self, device: str) -> int:
        """Bytes this process holds on ``device`` (``cpu`` or ``cuda:N``) now."""
        ...

    def trim(self) -> None:
        """Return host memory freed by an unload to the OS (a no-op where that is automatic)."""
        ...


class FrameworkMemory:
    """``DeviceMemory`` from ``/proc`` and the frameworks' documented memory APIs."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        self._libc: Any = None
        if name:
            try:
                self._libc = ctypes.CDLL(name)
            except OSError:
                self._libc = None

    def used(self, device: str) -> int:
        if device == "cpu":
            return host_rss()
        index = int(device.partition(":")[2] or 0)
        return cuda_used(index)

    def trim(self) -> None:
        trim = getattr(self._libc, "malloc_trim", None)
        if trim is not None:
            trim(0)


def return_large_blocks() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD_BYTES`` (see the module docstring), unless
    ``MALLOC_MMAP_THRESHOLD_`` set one already. True when the setting was made."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def host_rss() -> int:
    """Resident bytes of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


def cuda_used(index: int) -> int:
    """Bytes the imported frameworks' allocators hold on GPU ``index``; see the module docstring."""
    total = 0
    found = False
    # A framework another load thread is still importing is in sys.modules half-made (its
    # attributes missing): it holds nothing yet, so it is skipped rather than read.
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and cuda.is_available():
        total += int(cuda.memory_allocated(index))
        found = True
    tf = sys.modules.get("tensorflow")
    tf_config = getattr(tf, "config", None)
    if tf_config is not None and tf_config.list_physical_devices("GPU"):
        total += int(tf_config.experimental.get_memory_info(f"GPU:{index}")["current"])
        found = True
    if found:
        return total
    return _device_used(index)


def _device_used(index: int) -> int:
    """The device's used bytes (every process), or 0 when no library can read it."""
    try:
        import torch

        if torch.cuda.is_available():
            free, size = torch.cuda.mem_get_info(index)
            return int(size - free)
    except ImportError:
        pass
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return int(info.used)
    except Exception:  # not installed, or no driver
        log.debug("no library reads GPU %d's memory; charging estimates", index)
        return 0
