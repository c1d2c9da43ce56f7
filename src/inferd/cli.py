"""The ``inferd`` command. ``inferd serve`` takes TensorFlow Serving's flags with their names.

Every ``serve`` flag can also come from an environment variable ``INFERD_<FLAG NAME IN CAPITALS>``
(e.g. ``INFERD_REST_API_PORT=9000``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from inferd.config import INERT_TFSERVING_FLAGS, ServerConfig
from inferd.errors import ConfigError, InferdError

_KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
"""A ``ServerConfig`` field's annotation -> the type its flag parses."""
_T = TypeVar("_T")
_REPEATABLE = {"memory_budget"}
"""Flags given once per value, joined with commas into their ``ServerConfig`` field."""


class _BadEnvironment:
    """The default of a ``serve`` flag whose ``INFERD_<FLAG>`` value does not parse: refused when
    ``serve`` runs without the flag (which wins), not while every command's parser is built."""

    def __init__(self, variable: str, reason: str) -> None:
        self.message = f"{variable}: {reason}"


def _bool(text: str) -> bool:
    """TF Serving's boolean flags: --flag, --flag=true, --flag=false (also 1/0, yes/no)."""
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _whole(least: int) -> Callable[[str], int]:
    """A flag that takes a whole number, ``least`` or more."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number of {least} or more, got {text!r}")
        return value

    return parse


_at_least_one = _whole(1)


def _positive(text: str) -> float:
    """A finite number above 0."""
    if not 0 < (value := _number(text)) < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text!r}")
    return value


def _not_negative(text: str) -> float:
    """A finite number, 0 or more."""
    if not 0 <= (value := _number(text)) < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number of 0 or more, got {text!r}")
    return value


def _number(text: str) -> float:
    """``text`` as a float; NaN when it is not a number."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _list_of(kind: Callable[[str], _T]) -> Callable[[str], tuple[_T, ...]]:
    """A comma-separated flag, each item parsed by ``kind``."""

    def parse(text: str) -> tuple[_T, ...]:
        return tuple(kind(item) for item in _names(text))

    return parse


def _snake_case_flags(parser: argparse.ArgumentParser) -> Callable[..., argparse.Action]:
    """``parser.add_argument``, spelling each ``--kebab-case`` flag ``--snake_case`` as ``serve``
    (TF Serving) does, and keeping the kebab-case spelling as an alias."""

    def add(*names: str, **options: Any) -> argparse.Action:
        spelled = []
        for name in names:
            if name.startswith("--") and "-" in name[2:]:
                spelled.append("--" + name[2:].replace("-", "_"))
            spelled.append(name)
        return parser.add_argument(*spelled, **options)

    return add


def _serve_parser(sub: Any) -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="serve models over TF Serving's REST API",
        description=(
            "Serve models. Give one model with --model_name and --model_base_path, several with "
            "--model_config_file, or a model repository folder DIR whose sub-folders are models "
            "(each holding numbered version folders)."
        ),
        epilog="Every flag may also be set as INFERD_<FLAG> in the environment, e.g. INFERD_REST_API_PORT.",
    )
    options = {f.name: f for f in fields(ServerConfig)}
    parser.add_argument(
        "repository", nargs="?", metavar="DIR", help=options.pop("repository").metadata["help"]
    )
    for name, option in options.items():
        kind, text = _KINDS[str(option.type)], option.metadata["help"]
        default = getattr(defaults, name)
        convert = _bool if kind is bool else kind
        env = os.environ.get(f"INFERD_{name.upper()}")
        extra: dict[str, Any] = {"nargs": "?", "const": True} if kind is bool else {}
        value: Any = default
        if name in _REPEATABLE:  # each use adds a value; the environment's are comma-separated
            extra, value = {"action": "append"}, None if env is None else env.split(",")
            default = value
        elif env is not None:
            try:
                value = convert(env)
            except argparse.ArgumentTypeError as error:
                value = _BadEnvironment(f"INFERD_{name.upper()}", str(error))
            except ValueError:
                value = _BadEnvironment(f"INFERD_{name.upper()}", f"invalid {kind.__name__} value: {env!r}")
        parser.add_argument(
            f"--{name}",
            type=convert,
            default=value,
            metavar="BOOL" if kind is bool else kind.__name__.upper(),
            help=f"{text} (default: {default!r})",
            **extra,
        )
    parser.add_argument(
        "--version", action="store_true", help="print inferd's version and the TF Serving API it speaks"
    )
    for name, (kind, reason) in INERT_TFSERVING_FLAGS.items():
        parser.add_argument(
            f"--{name}",
            type=_bool if kind is bool else kind,
            nargs="?",
            const=True if kind is bool else None,
            default=None,
            metavar="BOOL" if kind is bool else kind.__name__.upper(),
            help=f"TF Serving flag accepted for compatibility; no effect: {reason}",
        )
    levels = ["debug", "info", "warning", "error"]
    level: Any = os.environ.get("INFERD_LOG_LEVEL", "info")
    if level not in levels:
        level = _BadEnvironment("INFERD_LOG_LEVEL", f"invalid choice: {level!r} (choose from {levels})")
    parser.add_argument("--log_level", default=level, choices=levels, help="log verbosity (default: info)")
    return parser


def _ray_parser(sub: Any) -> None:
    from inferd.ray import command as ray_command

    ray_command.add_parsers(sub, _serve_parser)


def _features_parser(sub: Any) -> None:
    parser = sub.add_parser("features", help="manage online features", description="Manage online features.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    load = actions.add_parser(
        "load",
        help="load a Parquet or CSV table into Redis",
        description="Write each row of TABLE to the Redis hash <prefix>:<entity>; re-running updates it.",
    )
    load.add_argument("table", metavar="TABLE", help="a .parquet or .csv file with a header")
    load.add_argument("--store", required=True, help="Redis URL, e.g. redis://localhost:6379/0")
    load.add_argument("--entity", required=True, help="entity column(s), comma-separated for a composite key")
    load.add_argument("--prefix", default="", help="key prefix (default: the entity column names)")
    load.add_argument(
        "--ttl", type=_whole(0), default=0, help="seconds until each hash expires (default: 0, never)"
    )
    load.add_argument(
        "--chunk_rows", type=_at_least_one, default=1000, help="rows per pipelined round trip (default: 1000)"
    )


def _load_features(args: argparse.Namespace) -> int:
    from pathlib import Path

    from inferd.features.load import load_table

    entity = tuple(name.strip() for name in args.entity.split(","))
    try:
        rows, seconds = load_table(
            Path(args.table), args.store, entity, args.prefix, args.ttl, args.chunk_rows
        )
    except Exception as exc:  # the table or Redis failed; say which and stop
        print(f"inferd features load: {exc}", file=sys.stderr)
        return 1
    print(
        f"loaded {rows:,} rows into {args.store} in {seconds:.2f} s ({rows / max(seconds, 1e-9):,.0f} rows/s)"
    )
    return 0


def _batch_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "batch",
        help="score files offline with a model, in-process",
        description=(
            "Score INPUT (a CSV, Parquet, JSONL or .npy file, a folder or glob of them, or a folder of "
            "images) with MODEL (a version folder, a base path whose latest version is used, or a "
            "repository with --model) and write OUTPUT (.parquet, .csv, .jsonl or .npy)."
        ),
    )
    # Each path may also be an object-store URI (s3://, gs://, az://).
    parser.add_argument("model_path", metavar="MODEL")
    parser.add_argument("input", metavar="INPUT")
    parser.add_argument("output", metavar="OUTPUT")
    add = _snake_case_flags(parser)
    add("--model", dest="model_name", help="model name when MODEL is a repository")
    add("--version", type=int, help="version to use (default: the latest)")
    add("--signature", default="serving_default", help="signature to call (default: serving_default)")
    add("--batch-size", type=int, default=0, help="rows per predict call (default: chosen by a short probe)")
    add("--threads", type=int, default=0, help="predict calls at once (default: one per CPU)")
    add("--id-column", help="input column written beside the predictions (default: the row number)")
    add("--keep-columns", default="", help="comma-separated input columns to copy to the output; * for all")
    add("--outputs", default="", help="comma-separated model outputs to write (default: all)")
    add("--rejects", help="where rejected rows go, as JSON lines (default: OUTPUT.rejects.jsonl)")
    add("--resume", action="store_true", help="continue an interrupted run, skipping its finished chunks")
    add("--memory-budget-mb", type=float, default=1024.0, help="memory for rows in flight (default: 1024)")
    add(
        "--price-per-hour",
        type=float,
        default=0.0,
        help="machine price per hour, for the cost in the summary",
    )
    add(
        "--progress",
        choices=["auto", "bar", "log", "none"],
        default="auto",
        help="a progress bar, log lines, or nothing (default: a bar on a terminal, else lines)",
    )
    add("--log-interval", type=float, default=10.0, help="seconds between progress log lines (default: 10)")
    add("--summary-json", type=Path, help="also write the summary to this file as JSON")
    add("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    add(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="score in this process, or with a pool of Ray Data actors (pip install 'inferd[ray]')",
    )
    add("--address", default="", help="with --engine ray: the Ray cluster to use (default: start one)")
    add(
        "--actors",
        type=int,
        default=0,
        help="with --engine ray: scoring actors, each loading the model once (default: the cluster's "
        "CPUs / --threads)",
    )
    return parser


def _batch(args: argparse.Namespace) -> int:
    from inferd import offline
    from inferd.storage import Scratch

    if args.actors < 0:
        print(f"inferd batch: --actors must be 0 or more, got {args.actors}", file=sys.stderr)
        return 2
    if args.engine == "ray" and importlib.util.find_spec("ray") is None:
        print("inferd batch: --engine ray needs Ray: pip install 'inferd[ray]'", file=sys.stderr)
        return 2

    scratch = Scratch()  # object-store paths are copied in, and the outputs back
    try:
        model = scratch.model(args.model_path, "MODEL", args.model_name, args.version)
        source = scratch.input(args.input, "INPUT")
        output = scratch.output(args.output, "OUTPUT")
        rejects = scratch.output(args.rejects or f"{args.output}.rejects.jsonl", "--rejects")
    except InferdError as exc:
        scratch.close()
        print(f"inferd batch: {exc.message}", file=sys.stderr)
        return 2
    options = offline.BatchOptions(
        model=model,
        input=source,
        output=output,
        model_name=args.model_name,
        version=args.version,
        signature=args.signature,
        batch_size=args.batch_size,
        threads=args.threads,
        id_column=args.id_column,
        keep_columns=_names(args.keep_columns),
        outputs=_names(args.outputs),
        rejects=rejects,
        resume=args.resume,
        memory_budget_mb=args.memory_budget_mb,
        price_per_hour=args.price_per_hour,
        progress=args.progress,
        log_interval_s=args.log_interval,
    )
    engine = None
    if args.engine == "ray":
        from inferd.ray import batch

        engine = batch.engine(args.model_path, args.address, args.actors)
    try:
        summary = offline.run(options, engine)
        scratch.publish()
    except InferdError as exc:
        print(f"inferd batch: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("inferd batch: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130
    finally:
        scratch.close()
    print("\n".join(summary.lines()), file=sys.stderr)
    if args.summary_json:
        args.summary_json.write_bytes(summary.to_json())
    return 1 if summary.rejected else 0


def _bench_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="load a model server and report latency, throughput, errors and cost",
        description=(
            "Send requests to URL (http://host:port for REST, host:port for gRPC) for --model in a "
            "closed loop (--concurrency, a sweep) and/or an open loop (--rate, requests due on a fixed "
            "schedule, latency counted from when each was due) and report each step."
        ),
    )
    parser.add_argument("url", metavar="URL")
    add = _snake_case_flags(parser)
    add("--model", required=True, help="model name")
    add(
        "--protocol",
        default="rest",
        choices=["rest", "v2", "v2-binary", "grpc", "v2-grpc"],
        help="TF Serving REST, V2 REST JSON or binary, TF Serving gRPC, V2 gRPC (default: rest)",
    )
    add("--version", type=_whole(0), help="model version (default: the server's choice)")
    add(
        "--instances",
        type=_at_least_one,
        default=1,
        help="rows per request when generating the payload (default: 1)",
    )
    add("--payload", type=Path, help="request payload: a REST .json body, or .npy / .npz tensors")
    add(
        "--concurrency",
        type=_list_of(_at_least_one),
        default=(),
        help="comma-separated concurrencies of the closed loop (default: 1)",
    )
    add(
        "--rate",
        type=_list_of(_positive),
        default=(),
        help="comma-separated request rates (per second, at most 1,000,000) of the open loop",
    )
    add("--duration", type=_positive, default=10.0, help="measured seconds per step (default: 10)")
    add(
        "--warmup",
        type=_not_negative,
        default=2.0,
        help="seconds of load before each step is measured (default: 2)",
    )
    add("--timeout", type=_positive, default=10.0, help="seconds a request may take (default: 10)")
    add("--processes", type=_at_least_one, default=1, help="load generator processes (default: 1)")
    add(
        "--max-connections",
        type=_at_least_one,
        default=1024,
        help="HTTP connections of the open loop (default: 1024)",
    )
    add(
        "--server-pid",
        type=_whole(1),
        help="server process to measure (with its children) for CPU and memory",
    )
    add("--metrics-url", help="server's Prometheus page (default: URL/metrics when it has process metrics)")
    add(
        "--metadata-url",
        help="REST base URL to read the model's metadata from (TF Serving's or V2's API, as --protocol)",
    )
    add("--path", help="REST route to POST to instead of the protocol's (servers with their own routes)")
    add(
        "--price-per-hour",
        type=_not_negative,
        default=0.0,
        help="server price per hour, for cost per million",
    )
    add("--tls-ca", help="PEM file of the CA the server's certificate chains to: TLS (https:// implies it)")
    add("--tls-cert", help="PEM client certificate, for a server that wants mutual TLS")
    add("--tls-key", help="PEM private key of --tls-cert")
    add(
        "--api-token",
        default=os.environ.get("INFERD_API_TOKEN", ""),
        help="the server's --api_token, sent as a bearer token with every request (or INFERD_API_TOKEN)",
    )
    add("--json", dest="json_path", help="write the report as JSON to this file (- for stdout)")
    add("--plot", type=Path, help="write latency percentiles against throughput to this PNG")
    add("--log_level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def _bench(args: argparse.Namespace) -> int:
    from inferd import loadtest
    from inferd.loadtest.payloads import ClientTls

    if args.plot and not _can_plot("bench"):
        return 2
    outputs = [("--json", Path(args.json_path))] if args.json_path not in (None, "-") else []
    for flag, path in [*outputs, *([("--plot", args.plot)] if args.plot else [])]:
        if not path.parent.is_dir():  # found out now, not after the whole run
            print(f"inferd bench: {flag} {path}: no directory {path.parent}", file=sys.stderr)
            return 2
    if args.tls_key and not args.tls_cert:
        print("inferd bench: --tls-key needs --tls-cert", file=sys.stderr)
        return 2
    tls = (
        ClientTls(args.tls_ca or "", args.tls_cert or "", args.tls_key or "")
        if args.tls_ca or args.tls_cert
        else None
    )
    if tls is not None:
        try:
            tls.ssl_context()  # reads the files now, not in the load generator's processes
        except OSError as exc:  # ssl.SSLError included
            print(f"inferd bench: --tls-ca/--tls-cert/--tls-key: {exc}", file=sys.stderr)
            return 2
    options = loadtest.BenchOptions(
        url=args.url,
        model=args.model,
        protocol=args.protocol,
        version=args.version,
        instances=args.instances,
        payload=args.payload,
        concurrency=args.concurrency,
        rates=args.rate,
        duration_s=args.duration,
        warmup_s=args.warmup,
        timeout_s=args.timeout,
        processes=args.processes,
        max_connections=args.max_connections,
        server_pid=args.server_pid,
        metrics_url=args.metrics_url,
        metadata_url=args.metadata_url,
        price_per_hour=args.price_per_hour,
        path=args.path,
        tls=tls,
        api_token=args.api_token,
    )
    steps = loadtest.steps_of(options)
    print(
        f"inferd bench: {len(steps)} step(s) of {options.warmup_s:g} s warm-up and "
        f"{options.duration_s:g} s measured each",
        file=sys.stderr,
        flush=True,
    )

    def progress(report: loadtest.StepReport) -> None:
        index = len(done) + 1
        done.append(report)
        print(loadtest.progress_line(report, index, len(steps)), file=sys.stderr, flush=True)

    done: list[loadtest.StepReport] = []
    try:
        reports = loadtest.run(options, progress)
    except ValueError as exc:
        print(f"inferd bench: {exc}", file=sys.stderr)
        return 2
    report = loadtest.to_json(options, reports)
    if args.json_path == "-":
        sys.stdout.write(report.decode() + "\n")
    else:
        print(loadtest.table(reports))
    try:
        if args.json_path not in (None, "-"):
            Path(args.json_path).write_bytes(report)
        if args.plot:
            loadtest.plot(reports, args.plot, f"{args.model} over {args.protocol}")
    except OSError as exc:
        print(f"inferd bench: cannot write the report: {exc}", file=sys.stderr)
        return 2
    if not any(r.succeeded for r in reports):
        said = "; ".join(loadtest.error_messages(reports)) or "no answer"
        print(f"inferd bench: every request failed: {said}", file=sys.stderr)
        return 1
    return 0


def _can_plot(command: str) -> bool:
    """Whether matplotlib is there for ``--plot``: checked before measuring, not after."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    print(f"inferd {command}: --plot needs matplotlib: pip install 'inferd[plot]'", file=sys.stderr)
    return False


def _select_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "select",
        help="measure candidate models and pick the best one that meets every budget",
        description=(
            "Measure each CANDIDATE (a version folder, a model base path whose latest version is used, "
            "or an `inferd optimize` output folder) on a labelled validation set on this machine, and "
            "pick the one with the best --optimize metric among those meeting every --require. "
            "Exit status: 0 with a winner, 3 when none qualifies, 2 for bad input. See docs/select.md."
        ),
    )
    # CANDIDATE, --data, MODEL, --out and --calibration may also be object-store URIs.
    parser.add_argument("candidates", metavar="CANDIDATE", nargs="+")
    add = _snake_case_flags(parser)
    add(
        "--data",
        required=True,
        help="validation set: a CSV, Parquet, JSONL or .npy file, or a folder of them",
    )
    add("--label", required=True, help="label column (with .npy data: a .npy file of labels)")
    add(
        "--drop_columns",
        default="",
        help="comma-separated columns of --data to leave out: neither inputs nor the label (an id)",
    )
    add(
        "--optimize",
        required=True,
        help="accuracy, precision, recall, f1, auc, mae, rmse, or a function file.py:func or module:func",
    )
    add(
        "--require",
        action="append",
        default=[],
        metavar="METRIC<OP>NUMBER",
        help='a budget, e.g. "p99_ms<=5" (repeatable; ops <=, <, >=, >)',
    )
    add("--direction", choices=["max", "min"], help="max (higher is better) or min (default: by metric)")
    add("--average", default="macro", help="averaging of precision, recall, f1 (default: macro)")
    add("--output", help="model output to score (default: chosen by the metric)")
    add(
        "--signature",
        help="signature to call (default: serving_default; for auc, predict_proba where a model has it)",
    )
    add(
        "--price-per-hour",
        type=_not_negative,
        default=0.0,
        help="machine price per hour, for cost_per_million",
    )
    add(
        "--batch-size",
        type=_whole(0),
        default=0,
        help="rows per call when measuring throughput (default: probed)",
    )
    add("--url", help="also measure through the server at this URL, which serves each candidate by name")
    add("--json", dest="json_path", type=Path, help="write the report as JSON to this file")
    add("--markdown", type=Path, help="write the report as Markdown to this file")
    add("--plot", type=Path, help="write the optimizing metric against each budget to this PNG")
    add("--promote", type=Path, metavar="REPO/NAME", help="copy the winner in as the next version here")
    add("--promote-label", help="with --promote: move this version label to the new version")
    add("--model_config_file", type=Path, help="with --promote-label: the model config file holding labels")
    add("--wait-url", help="with --promote-label: wait until this server serves the new version")
    add("--apply", action="store_true", help="with --promote: do it (default: print the change only)")
    add(
        "--allow_api_change",
        action="store_true",
        help="with --promote: promote even when the winner's signatures or answer form differ from the "
        "served version's (the difference is printed either way)",
    )
    add(
        "--canary",
        action="store_true",
        help="with --promote and --wait_url: move the label through a guarded canary rollout on that server "
        "(as inferd rollout; --promote_label defaults to stable)",
    )
    add("--steps", default="1,5,25,50,100", help="with --canary: canary percents, increasing, ending at 100")
    add("--step_s", type=_positive, default=60.0, help="with --canary: seconds each step lasts")
    add(
        "--guard",
        action="append",
        default=[],
        help='with --canary: e.g. "error_rate<=0.01", "p99_ms<=1.2*baseline" (repeatable)',
    )
    add("--on_restart", default="rollback", choices=["rollback", "resume"], help="with --canary")
    add("--min_requests", type=_whole(0), default=0, help="with --canary: canary requests each step needs")
    add(
        "--admin_token",
        default=os.environ.get("INFERD_ADMIN_TOKEN", ""),
        help="with --canary: the server's admin token (or INFERD_ADMIN_TOKEN)",
    )
    add("--log_level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def _optimize_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "optimize",
        help="make smaller or faster variants of a model (ONNX, quantised, float16, TFLite)",
        description=(
            "Write variants of MODEL (a version folder, or a base path whose latest version is used) "
            "to OUT/<variant>/, each a version folder inferd serves, with a variant.json saying how it was "
            "made; OUT/variants.json lists every attempt. A variant that fails is reported and the others "
            "go on; the exit status is 0 when at least one was made. See docs/optimize.md."
        ),
    )
    parser.add_argument("model_path", metavar="MODEL")
    add = _snake_case_flags(parser)
    add("--out", required=True, help="folder (or object-store URI) to write the variants to")
    add(
        "--calibration",
        help="input rows (CSV, Parquet, JSONL or .npy, columns as for inferd batch) for static int8 "
        "quantisation; also used to compare each variant with the original",
    )
    add("--only", default="", help="comma-separated variants to make (default: every one that applies)")
    add("--tflite", action="store_true", help="also make TFLite variants (Keras and TensorFlow models)")
    add("--log_level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def _select(args: argparse.Namespace) -> int:
    from inferd import select
    from inferd.select import command
    from inferd.select import promote as promotion
    from inferd.storage import Scratch

    if args.plot and not _can_plot("select"):
        return 2
    scratch = Scratch()  # object-store candidates and data are copied in
    try:
        candidates = tuple(scratch.model(c, "CANDIDATE") for c in args.candidates)
        data = scratch.input(args.data, "--data")
    except InferdError as exc:
        scratch.close()
        print(f"inferd select: {exc.message}", file=sys.stderr)
        return 2
    options = select.SelectOptions(
        candidates=candidates,
        data=data,
        label=args.label,
        optimize=args.optimize,
        requirements=tuple(args.require),
        direction=args.direction,
        average=args.average,
        output=args.output,
        signature=args.signature,
        price_per_hour=args.price_per_hour,
        batch_size=args.batch_size,
        url=args.url,
        drop_columns=_names(args.drop_columns),
    )
    promote = None
    if args.promote:
        canary = None
        if args.canary:
            try:
                steps = tuple(_not_negative(p) for p in args.steps.split(","))
            except argparse.ArgumentTypeError:
                print(
                    f"inferd select: --steps must be comma-separated percents, got {args.steps!r}",
                    file=sys.stderr,
                )
                scratch.close()
                return 2
            canary = promotion.Canary(
                steps, args.step_s, tuple(args.guard), args.on_restart, args.admin_token, args.min_requests
            )
        promote = command.PromoteOptions(
            args.promote,
            args.promote_label or ("stable" if args.canary else None),
            args.model_config_file,
            args.apply,
            args.wait_url,
            allow_api_change=args.allow_api_change,
            canary=canary,
        )
    outputs = command.Outputs(args.json_path, args.markdown, args.plot)
    try:
        return command.execute(options, outputs, promote)
    finally:
        scratch.close()


def _optimize(args: argparse.Namespace) -> int:
    from inferd import optimize
    from inferd.storage import Scratch

    scratch = Scratch()  # an object-store model and calibration are copied in, the variants out
    try:
        model = scratch.model(args.model_path, "MODEL")
        out = scratch.output(args.out, "--out")
        calibration = scratch.input(args.calibration, "--calibration") if args.calibration else None
    except InferdError as exc:
        scratch.close()
        print(f"inferd optimize: {exc.message}", file=sys.stderr)
        return 2
    options = optimize.OptimizeOptions(
        model=model,
        out=out,
        calibration=calibration,
        only=_names(args.only),
        tflite=args.tflite,
    )

    def report(outcome: optimize.Variant) -> None:
        print(f"{outcome.name}: {outcome.path}" if outcome.ok else f"{outcome.name}: FAILED: {outcome.error}")

    try:
        outcomes = optimize.run(options, report)
        scratch.publish()
    except InferdError as exc:
        print(f"inferd optimize: {exc.message}", file=sys.stderr)
        return 2
    finally:
        scratch.close()
    made = sum(outcome.ok for outcome in outcomes)
    print(f"{made} of {len(outcomes)} variants made in {args.out}")
    return 0 if made else 1


def _log_inert_flags(args: argparse.Namespace) -> None:
    """One line per TF Serving flag given that has no effect in inferd, with the reason."""
    log = logging.getLogger("inferd.cli")
    for name, (_, reason) in INERT_TFSERVING_FLAGS.items():
        if getattr(args, name, None) is not None:
            log.info("--%s has no effect in inferd: %s", name, reason)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _rollout_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "rollout",
        help="move a running server's traffic to a new version step by step, guarded by live metrics",
        description=(
            "Start a guarded canary rollout of MODEL on a running server (admin route, --admin_token) "
            "and follow it: the split moves from the version --label points to towards --to, step by "
            "step; a failed guard rolls it back at once; the last step moves the label. Exits 0 when "
            "done, 1 when rolled back. With --status, --pause, --resume, --promote or --abort, act on "
            "the model's rollout instead and print its state."
        ),
    )
    parser.add_argument("model", metavar="MODEL")
    add = _snake_case_flags(parser)
    add("--to", type=_whole(0), help="the canary version (needed to start one)")
    actions = parser.add_mutually_exclusive_group()
    for action, what in (
        ("status", "print the state of the model's last rollout"),
        ("pause", "hold the split where it is, checking no guard, until --resume"),
        ("resume", "start a paused rollout's current step again"),
        ("promote", "end the rollout now as if its last step passed: the label moves"),
        ("abort", "end the rollout now as a failed guard does: 100%% on the baseline"),
    ):
        actions.add_argument(f"--{action}", dest="action", action="store_const", const=action, help=what)
    add("--label", default="stable", help="the label that points to the baseline and moves at the end")
    add("--steps", default="1,5,25,50,100", help="canary percents, increasing, ending at 100")
    add(
        "--step_s", type=_positive, default=60.0, help="seconds each step lasts before its guards are checked"
    )
    add(
        "--guard",
        action="append",
        default=[],
        help='e.g. "error_rate<=0.01", "p99_ms<=1.2*baseline", "agreement>=0.98" (repeatable)',
    )
    add(
        "--on_restart",
        default="rollback",
        choices=["rollback", "resume"],
        help="if the server restarts mid-way",
    )
    add(
        "--min_requests",
        type=_whole(0),
        default=0,
        help="canary requests each step needs before its guards are checked; it waits on until then",
    )
    add("--url", default="http://127.0.0.1:8501", help="the server's REST address")
    add("--admin_token", default=os.environ.get("INFERD_ADMIN_TOKEN", ""), help="(or INFERD_ADMIN_TOKEN)")
    add("--no_wait", action="store_true", help="start it and return at once")
    add("--log_level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def _rollout(args: argparse.Namespace) -> int:
    from inferd.rollout import RolloutClient, describe

    client = RolloutClient(args.url, args.admin_token)
    try:
        if args.action:
            state = client.command(args.model, args.action)
            canary, where = state["canary"], f"{state['state']} (step {state['step']})"
            print(f"rollout of {args.model} to version {canary}: {where}")
            return 0
        if args.to is None:
            print("inferd rollout: --to VERSION is needed to start a rollout", file=sys.stderr)
            return 2
        try:
            steps = [_not_negative(p) for p in args.steps.split(",")]
        except argparse.ArgumentTypeError:
            print(
                f"inferd rollout: --steps must be comma-separated percents, got {args.steps!r}",
                file=sys.stderr,
            )
            return 2
        body = {
            "to": args.to,
            "label": args.label,
            "steps": steps,
            "step_s": args.step_s,
            "guards": args.guard,
            "on_restart": args.on_restart,
            "min_requests": args.min_requests,
        }
        state = client.command(args.model, "start", body)
        if args.no_wait:
            for event in state["history"]:
                print(describe(event))
        else:
            state = client.follow(args.model, state, min(1.0, args.step_s / 4), lambda e: print(describe(e)))
    except InferdError as exc:  # refused, or the server could not be reached: 2, not a rollback's 1
        print(f"inferd rollout: {exc.message}", file=sys.stderr)
        return 2
    print(f"rollout of {args.model} to version {args.to}: {state['state']}")
    return 0 if state["state"] in ("done", "running") else 1


class _Parser(argparse.ArgumentParser):
    """An argument parser that refuses arguments it does not know itself, so that a mistyped
    flag of a subcommand (``inferd serve --rest_api_prot=1``) is reported with that
    subcommand's usage rather than the top level's; subcommand parsers inherit the class."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed, extra


def _version() -> str:
    """inferd's version, from the installed package's metadata."""
    from importlib import metadata

    try:
        return metadata.version("inferd")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from inferd import __version__

        return f"{__version__} (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="inferd", description="inferd: a model server for any framework")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    _features_parser(sub)
    _batch_parser(sub)
    _bench_parser(sub)
    _select_parser(sub)
    _optimize_parser(sub)
    _rollout_parser(sub)
    _ray_parser(sub)
    args = parser.parse_args(argv)
    bad = [value for value in vars(args).values() if isinstance(value, _BadEnvironment)]
    if bad:
        print(f"inferd {args.command}: {bad[0].message}", file=sys.stderr)
        return 2
    if args.command == "features":
        return _load_features(args)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "batch":
        return _batch(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "select":
        return _select(args)
    if args.command == "optimize":
        return _optimize(args)
    if args.command == "rollout":
        return _rollout(args)
    if args.command == "ray":
        from inferd.ray import command as ray_command

        return ray_command.main(args)
    if args.version:
        from inferd import __version__

        print(f"inferd {__version__} (TensorFlow ModelServer API)")
        return 0
    _log_inert_flags(args)
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if hasattr(args, f.name)}
    values["memory_budget"] = ",".join(args.memory_budget or ())
    if values.get("num_load_threads") == 0:
        values["num_load_threads"] = 1  # TF Serving's 0 loads in its manager's loop: one at a time
    from inferd.config import worker_count

    try:
        config = ServerConfig(**{k: v for k, v in values.items() if v is not None})
        if args.repository and (config.model_config_file or config.model_base_path):
            parser.error("give either a repository DIR or --model_base_path / --model_config_file, not both")
        workers = worker_count(config.workers)
        if workers > 1:  # the supervisor imports no server code before it forks the workers
            from inferd.workers import Supervisor

            return Supervisor(config, workers).run()
        from inferd import server

        server.run(config)
    except ConfigError as exc:
        print(f"inferd: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
