"""The server's side of a step: CPU-seconds and peak memory, from ``/proc`` or Prometheus.

With ``--server-pid`` the process and all its descendants are read from ``/proc`` (utime + stime,
resident memory); with a metrics URL, prometheus-client's ``process_cpu_seconds_total`` and
``process_resident_memory_bytes`` (one process). Memory is sampled in a thread every
``interval_s`` while the step runs; CPU is read before and after. A step during which the server
could not be read at its start or end (it stopped, or its page went away) has no usage: a
difference against a missing reading would be a wrong figure.
"""

from __future__ import annotations

import math
import threading
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from inferd.usage import read_pid


@dataclass(frozen=True, slots=True)
class ServerUsage:
    """What the server spent during one step."""

    cpu_s: float
    peak_memory_bytes: int


def read_metrics(url: str, api_token: str = "") -> tuple[float, int]:
    """``process_cpu_seconds_total`` and ``process_resident_memory_bytes`` from a metrics page
    (asked with ``api_token`` as a bearer token when given).

    Raises:
        OSError: the page cannot be fetched.
        ValueError: it lacks the process metrics.
    """
    with urllib.request.urlopen(_request(url, api_token), timeout=5) as response:
        text = response.read().decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in ("process_cpu_seconds_total", "process_resident_memory_bytes")
    }
    if len(values) < 2:
        raise ValueError(f"{url} has no process_cpu_seconds_total and process_resident_memory_bytes")
    return values["process_cpu_seconds_total"], int(values["process_resident_memory_bytes"])


def _request(url: str, api_token: str) -> urllib.request.Request:
    """A GET of ``url``, with ``api_token`` as a bearer token when given."""
    headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
    return urllib.request.Request(url, headers=headers)


class ServerWatch:
    """Measures one step; ``start`` before the load, ``stop`` after it. Either ``pid`` or
    ``metrics_url`` is given; ``api_token`` is sent to the metrics page."""

    def __init__(
        self, pid: int | None, metrics_url: str | None, interval_s: float = 0.25, *, api_token: str = ""
    ) -> None:
        self._pid, self._url, self._token = pid, metrics_url, api_token
        self._interval_s = interval_s if pid else max(interval_s, 1.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu_start = 0.0
        self._peak = 0

    def read(self) -> tuple[float, int]:
        """The server's CPU-seconds and resident bytes now.

        Raises:
            OSError: the process is not running, or its metrics page cannot be fetched.
            ValueError: the page lacks the process metrics.
        """
        if self._pid is not None:
            cpu, memory = read_pid(self._pid)
            if not memory:
                raise OSError(f"no process {self._pid} is running")
            return cpu, memory
        assert self._url is not None
        return read_metrics(self._url, self._token)

    def start(self) -> None:
        try:
            self._cpu_start, self._peak = self.read()
        except (OSError, ValueError):
            self._cpu_start = math.nan  # no usage for this step
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="inferd-bench-watch", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._peak = max(self._peak, self.read()[1])
            except (OSError, ValueError):
                continue  # a missed sample; the next one counts

    def stop(self) -> ServerUsage | None:
        """What the server spent since ``start``; None when it could not be read at either end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            cpu, memory = self.read()
        except (OSError, ValueError):
            return None
        if math.isnan(self._cpu_start):
            return None
        return ServerUsage(cpu - self._cpu_start, max(self._peak, memory))
