"""``inferd bench``: load any TF Serving or V2 server and report latency, throughput, errors, cost.

A run is a list of steps (each concurrency of a closed-loop sweep, then each rate of an open
loop). Each step warms up, measures for ``duration_s`` and reports requests/s, predictions/s,
latency percentiles of the successful requests, errors by status and, when the server is
watched (``--server-pid``, or its Prometheus metrics), its CPU-seconds per 1,000 predictions and
peak memory. ``processes`` > 1 splits the load over processes started together. Each step is
reported as it completes (``run``'s ``on_step``), with the server's first few error messages.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from inferd.loadtest.drivers import CLOSED, OPEN, Samples, measure, succeeded
from inferd.loadtest.payloads import ClientTls, Payload, build
from inferd.loadtest.serverside import ServerUsage, ServerWatch, read_metrics

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
MAX_RATE = 1_000_000
"""The most requests per second an open-loop step schedules: each due request is scheduled and
kept on its own, so a rate far past what the loop can send would only fill memory."""


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """One ``inferd bench`` run; see ``inferd bench --help`` for each option."""

    url: str
    model: str
    protocol: str = "rest"
    version: int | None = None
    instances: int = 1
    payload: Path | None = None
    concurrency: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    duration_s: float = 10.0
    warmup_s: float = 2.0
    timeout_s: float = 10.0
    processes: int = 1
    max_connections: int = 1024
    server_pid: int | None = None
    metrics_url: str | None = None
    """Prometheus page of the server; None tries ``URL/metrics`` for the REST protocols, "" never."""
    metadata_url: str | None = None
    """REST base URL to read the model's metadata from, instead of asking in ``protocol``."""
    price_per_hour: float = 0.0
    path: str | None = None
    """REST route to POST to instead of the protocol's, for servers with routes of their own."""
    tls: ClientTls | None = None
    """TLS towards the server; an ``https://`` URL implies it with the system's CAs."""
    api_token: str = ""
    """The server's ``--api_token``, sent as a bearer token with every request ("" for none)."""


@dataclass(frozen=True, slots=True)
class StepReport:
    """One step's figures; latencies in milliseconds, ``None`` where nothing was measured."""

    mode: str
    level: float
    requests: int
    requests_per_s: float
    predictions_per_s: float
    latency_ms: dict[str, float | None]
    errors: dict[str, int]
    all_statuses: dict[str, int]
    server_cpu_s_per_1k_predictions: float | None
    server_peak_memory_bytes: int | None
    cost_per_million_predictions: float | None
    error_messages: list[str] = field(default_factory=list)
    """The first distinct error messages, as ``"STATUS: message"`` (the server's own words)."""
    send_lag_ms: dict[str, float] = field(default_factory=dict)
    """Open loop: how late the load generator itself sent the requests due in the window
    (``p50``, ``p99``, ``max``); empty for a closed loop."""

    @property
    def fell_behind(self) -> bool:
        """Whether the generator could not keep to an open loop's schedule: over 1 in 100
        requests went out after the next one was due (and over 1 ms late, a timer's grain)."""
        return bool(self.send_lag_ms) and self.send_lag_ms["p99"] > max(1.0, 1000 / self.level)

    @property
    def name(self) -> str:
        """The step as the table and the plot label it: ``c=8`` or ``rate=500/s``."""
        return f"c={self.level:g}" if self.mode == CLOSED else f"rate={self.level:g}/s"

    @property
    def succeeded(self) -> int:
        """Requests answered successfully, warm-up included."""
        return sum(n for status, n in self.all_statuses.items() if succeeded(status))


def steps_of(options: BenchOptions) -> list[tuple[str, float]]:
    """The (mode, level) of each step, in the order they run: the concurrencies, then the rates."""
    steps = [(CLOSED, float(c)) for c in options.concurrency] + [(OPEN, r) for r in options.rates]
    return steps or [(CLOSED, 1.0)]


def run(options: BenchOptions, on_step: Callable[[StepReport], None] | None = None) -> list[StepReport]:
    """Run every step in turn; ``on_step`` is called with each step's report as it completes.

    Raises:
        ValueError: options that do not fit (no steps, unknown protocol, a payload file of the
            wrong kind, metadata that cannot be read, a ``server_pid`` that is not running or a
            ``metrics_url`` that cannot be read).
    """
    steps = steps_of(options)
    for mode, level in steps:
        if not 0 < level <= (MAX_RATE if mode == OPEN else math.inf):
            raise ValueError(
                f"rate: expected requests per second above 0 and at most {MAX_RATE:,}, got {level:g}"
                if mode == OPEN
                else f"concurrency: expected 1 or more, got {level:g}"
            )
    payload = build(
        options.url,
        options.protocol,
        options.model,
        version=options.version,
        instances=options.instances,
        payload=options.payload,
        metadata_url=options.metadata_url,
        path=options.path,
        tls=options.tls,
        api_token=options.api_token,
    )
    metrics_url = _metrics_url(options, payload)
    if options.server_pid or metrics_url:
        try:
            ServerWatch(options.server_pid, metrics_url, api_token=options.api_token).read()
        except (OSError, ValueError) as exc:
            flag = "--server_pid" if options.server_pid else "--metrics_url"
            raise ValueError(f"{flag}: cannot read the server's usage: {exc}") from None
    reports = []
    for mode, level in steps:
        watch = (
            ServerWatch(options.server_pid, metrics_url, api_token=options.api_token)
            if options.server_pid or metrics_url
            else None
        )
        samples, usage = _step(options, payload, mode, level, watch)
        reports.append(_report(options, payload, mode, level, samples, usage))
        if on_step is not None:
            on_step(reports[-1])
    return reports


def _metrics_url(options: BenchOptions, payload: Payload) -> str | None:
    if options.metrics_url is not None or options.server_pid or payload.is_grpc or payload.tls:
        return options.metrics_url or None
    url = f"http://{payload.host}:{payload.port}/metrics"
    try:
        read_metrics(url, options.api_token)
    except (OSError, ValueError):
        return None
    return url


def _step(
    options: BenchOptions, payload: Payload, mode: str, level: float, watch: ServerWatch | None
) -> tuple[Samples, ServerUsage | None]:
    args = (options.warmup_s, options.duration_s, options.timeout_s, options.max_connections)
    count = max(1, min(options.processes, int(level) if mode == CLOSED else options.processes))
    if count == 1:
        start_ns = time.monotonic_ns() + 20_000_000
        timers = _watch_window(watch, start_ns, options)
        samples = measure(payload, mode, level, start_ns, *args)
    else:
        context = multiprocessing.get_context("spawn")
        pipes, processes = [], []
        for i in range(count):
            share = level / count if mode == OPEN else int(level) // count + (i < int(level) % count)
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, payload, mode, share, *args), daemon=True)
            process.start()
            pipes.append(parent)
            processes.append(process)
        for pipe in pipes:
            pipe.recv()  # ready: imports done
        start_ns = time.monotonic_ns() + 100_000_000
        timers = _watch_window(watch, start_ns, options)
        for i, pipe in enumerate(pipes):
            # An open loop's processes take turns on one schedule (process i sends the requests
            # due at i, i + count, ... / rate s), so that together they send one request every
            # 1/rate s, as many as one process would, rather than `count` at once.
            pipe.send((start_ns, int(i * 1e9 / level) if mode == OPEN else 0))
        samples = Samples.merge([pipe.recv() for pipe in pipes])
        for process in processes:
            process.join()
    for timer in timers:
        timer.join()
    return samples, (watch.stop() if watch else None)


def _watch_window(watch: ServerWatch | None, start_ns: int, options: BenchOptions) -> list[threading.Timer]:
    """Start watching the server when the measured window opens (the stop comes after it)."""
    if watch is None:
        return []
    delay_s = (start_ns - time.monotonic_ns()) / 1e9 + options.warmup_s
    timer = threading.Timer(max(0.0, delay_s), watch.start)
    timer.start()
    return [timer]


def _worker(pipe: Connection, payload: Payload, mode: str, level: float, *args: Any) -> None:
    pipe.send("ready")
    start_ns, phase_ns = pipe.recv()
    pipe.send(measure(payload, mode, level, start_ns, *args, phase_ns=phase_ns))


def _report(
    options: BenchOptions,
    payload: Payload,
    mode: str,
    level: float,
    samples: Samples,
    usage: ServerUsage | None,
) -> StepReport:
    requests = sum(samples.statuses.values())
    ok = sum(n for status, n in samples.statuses.items() if succeeded(status))
    seconds = _seconds(options.duration_s, mode, samples)
    predictions_per_s = ok * payload.instances / seconds
    latencies = samples.latencies_ns / 1e6
    latency: dict[str, float | None] = {
        f"p{q:g}": float(np.percentile(latencies, q)) if len(latencies) else None for q in PERCENTILES
    }
    latency["max"] = float(latencies.max()) if len(latencies) else None
    cpu = None
    if usage is not None and predictions_per_s:
        cpu = usage.cpu_s / (ok * payload.instances) * 1000
    cost = (
        options.price_per_hour / 3600 / predictions_per_s * 1e6
        if options.price_per_hour and predictions_per_s
        else None
    )
    return StepReport(
        mode=mode,
        level=level,
        requests=requests,
        requests_per_s=requests / seconds,
        predictions_per_s=predictions_per_s,
        latency_ms=latency,
        errors={s: n for s, n in sorted(samples.statuses.items()) if not succeeded(s)},
        all_statuses=dict(sorted(samples.all_statuses.items())),
        server_cpu_s_per_1k_predictions=cpu,
        server_peak_memory_bytes=usage.peak_memory_bytes if usage else None,
        cost_per_million_predictions=cost,
        error_messages=list(samples.messages),
        send_lag_ms={
            name: float(value) / 1e6
            for name, value in zip(
                ("p50", "p99", "max"),
                (*np.percentile(samples.send_lags_ns, (50, 99)), samples.send_lags_ns.max()),
                strict=True,
            )
        }
        if len(samples.send_lags_ns)
        else {},
    )


def _seconds(duration_s: float, mode: str, samples: Samples) -> float:
    """The time the step's requests took to serve, that its rates are over: the window, or in an
    open loop the time from the first of its successful answers to the last when that is longer
    (the server fell behind the schedule and answered the window's requests after it closed), so
    that an overloaded server shows the rate it reached, not the rate it was offered."""
    if mode == CLOSED:
        return duration_s
    return max(duration_s, (samples.last_done_ns - samples.first_done_ns) / 1e9)


def to_json(options: BenchOptions, reports: list[StepReport]) -> bytes:
    """The run's options and every step, as JSON."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()}
    return orjson.dumps(
        {"options": settings, "steps": [dataclasses.asdict(r) for r in reports]}, option=orjson.OPT_INDENT_2
    )


def progress_line(report: StepReport, index: int, total: int) -> str:
    """One finished step in a line, for live progress; its first error message when it had any."""
    errors = sum(report.errors.values())
    p50, p99 = (_number(report.latency_ms[k]) for k in ("p50", "p99"))
    line = (
        f"step {index}/{total} {report.name}: {report.requests_per_s:,.0f} req/s, "
        f"{report.predictions_per_s:,.0f} pred/s, p50 {p50} ms, p99 {p99} ms, "
        f"{errors:,} error{'' if errors == 1 else 's'} of {report.requests:,}"
    )
    if report.error_messages:
        line += f" ({report.error_messages[0]})"
    if report.fell_behind:
        line += f"; {_behind(report)}"
    return line


def _behind(report: StepReport) -> str:
    lag = report.send_lag_ms
    return (
        f"the load generator fell behind the schedule (requests sent p50 {lag['p50']:,.2f} ms, "
        f"p99 {lag['p99']:,.2f} ms late; the latencies include it): use --processes"
    )


def error_messages(reports: list[StepReport]) -> list[str]:
    """Every step's distinct error messages, first seen first."""
    return list(dict.fromkeys(m for r in reports for m in r.error_messages))


def table(reports: list[StepReport]) -> str:
    """The steps as a plain-text table, then the distinct error messages the server gave."""
    header = [
        "step",
        "req/s",
        "pred/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        "cpu s/1k",
        "peak MiB",
        "$/M pred",
    ]
    rows = [header]
    for r in reports:
        step = r.name
        errors = ", ".join(f"{s}: {n}" for s, n in r.errors.items()) or "0"
        rows.append(
            [
                step,
                f"{r.requests_per_s:,.0f}",
                f"{r.predictions_per_s:,.0f}",
                *(_number(r.latency_ms[k]) for k in ("p50", "p90", "p99", "p99.9", "max")),
                errors,
                _number(r.server_cpu_s_per_1k_predictions, 3),
                _number(r.server_peak_memory_bytes / 2**20 if r.server_peak_memory_bytes else None, 0),
                _number(r.cost_per_million_predictions, 4),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    if messages := error_messages(reports):
        lines += ["", "errors (the first distinct messages):", *(f"  {m}" for m in messages)]
    if behind := [r for r in reports if r.fell_behind]:
        lines += ["", *(f"{r.name}: {_behind(r)}" for r in behind)]
    return "\n".join(lines)


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def plot(reports: list[StepReport], path: Path, title: str) -> None:
    """Latency percentiles against predictions/s, one line per percentile, each step's point
    labelled with its concurrency (``c=8``) or rate (``rate=500/s``); PNG, or any other format
    matplotlib writes, by ``path``'s suffix.

    Raises:
        ImportError: matplotlib is not installed (``pip install inferd[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for mode, marker in ((CLOSED, "o"), (OPEN, "s")):
        steps = [r for r in reports if r.mode == mode]
        for key in ("p50", "p90", "p99", "p99.9"):
            points = [
                (r.predictions_per_s, r.latency_ms[key]) for r in steps if r.latency_ms[key] is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker=marker, label=f"{key} ({mode} loop)")
        for r in steps:  # each step named once, at its highest percentile measured
            top = next((r.latency_ms[k] for k in ("p99.9", "p99", "p90", "p50") if r.latency_ms[k]), None)
            if top is not None:
                axes.annotate(
                    r.name,
                    (r.predictions_per_s, top),
                    textcoords="offset points",
                    xytext=(4, 6),
                    fontsize="small",
                )
    axes.set_xlabel("predictions/s")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
