"""``inferd ray serve``: the flags it adds to ``inferd serve``'s and what it runs. Imports no Ray
itself, so ``inferd --help`` works without the extra."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from inferd.config import ServerConfig
from inferd.errors import ConfigError
from inferd.ray.cold_start import WAIT_ENV

log = logging.getLogger(__name__)

LOCAL_PATHS = (
    "repository",
    "model_base_path",
    "model_config_file",
    "model_cache_dir",
    "batching_parameters_file",
    "monitoring_config_file",
    "rollout_state_dir",
    "grpc_socket_path",
)
"""``inferd serve`` settings naming files or folders, made absolute (from this command's working
directory) before they reach the replicas, which run in Ray's directories."""


def add_parsers(sub: Any, serve_parser: Callable[[Any], argparse.ArgumentParser]) -> None:
    """Add ``inferd ray serve`` (every ``inferd serve`` flag, made by ``serve_parser``, plus the
    Ray ones) and ``inferd ray status`` to the subcommands ``sub``."""
    parser = sub.add_parser("ray", help="serve on a Ray cluster (pip install 'inferd[ray]')")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="print each inferd replica's state as JSON")
    status.add_argument("--address", default="auto", help="Ray cluster (default: auto)")
    status.add_argument("--log_level", default="warning", choices=["debug", "info", "warning", "error"])
    add = serve_parser(actions).add_argument
    add(
        "--address",
        default="",
        help="Ray cluster to join, e.g. ray://head:10001 or auto (default: start one)",
    )
    add(
        "--proxy",
        choices=["haproxy", "python"],
        default="haproxy",
        help="Serve's ingress of a cluster this command starts: HAProxy (fast) or Serve's Python proxy; "
        "with --address the nodes' RAY_SERVE_ENABLE_HA_PROXY decides (docs/scale-out.md)",
    )
    add("--num_replicas", type=int, help="a fixed number of replicas (default: autoscale)")
    add("--min_replicas", type=int, help="fewest replicas when autoscaling (default: 1); 0 scales to zero")
    add("--max_replicas", type=int, help="most replicas when autoscaling (default: 1)")
    add(
        "--target_ongoing_requests",
        type=float,
        help="requests in flight per replica the autoscaler aims at (default: 8)",
    )
    add(
        "--target_loop_utilization",
        type=float,
        help="share of each replica's event-loop thread busy (0-1] the autoscaler aims at (default: 0.7)",
    )
    add("--upscale_delay_s", type=float, help="seconds of overload before adding replicas (default: 2)")
    add("--downscale_delay_s", type=float, help="seconds of slack before removing replicas (default: 10)")
    add(
        "--graceful_shutdown_timeout_s",
        type=float,
        help="seconds a replica being removed may take to finish its requests (default: 30)",
    )
    add(
        "--scale_from_zero_wait_s",
        type=float,
        default=None,
        help="seconds a prediction waits while no replica runs before 503 with Retry-After (default: 30; "
        "0: no bound); with --address the nodes' INFERD_SCALE_FROM_ZERO_WAIT_S decides",
    )
    add("--num_cpus", type=float, help="CPUs each replica reserves from Ray (default: 0)")
    add("--detach", action="store_true", help="deploy and exit, leaving the application running")


def main(args: argparse.Namespace) -> int:
    """Run ``inferd ray ACTION``."""
    if importlib.util.find_spec("ray") is None:
        print("inferd ray: Ray is not installed: pip install 'inferd[ray]'", file=sys.stderr)
        return 2
    if args.action == "status":
        from inferd.ray import deployment

        try:
            state = deployment.status(args.address)
        except ConfigError as exc:
            print(f"inferd ray: {exc.message}", file=sys.stderr)
            return 2
        print(json.dumps(state, indent=1, sort_keys=True))
        return 0
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if hasattr(args, f.name)}
    values["memory_budget"] = ",".join(args.memory_budget or ())  # repeatable, as for inferd serve
    for name in LOCAL_PATHS:  # the replicas do not run in this directory
        if values.get(name) and "://" not in values[name]:
            values[name] = os.path.abspath(values[name])
    try:
        config = ServerConfig(**{k: v for k, v in values.items() if v is not None})
    except ConfigError as exc:
        print(f"inferd ray: {exc.message}", file=sys.stderr)
        return 2
    if args.repository and (config.model_config_file or config.model_base_path):
        print(
            "inferd ray: give either a repository DIR or --model_base_path / --model_config_file",
            file=sys.stderr,
        )
        return 2
    if config.workers != "1":
        print("inferd ray: --workers does not apply on Ray; scale with --num_replicas", file=sys.stderr)
        return 2
    return _serve(args, config)


def _serve(args: argparse.Namespace, config: ServerConfig) -> int:
    """Deploy inferd on Ray; without ``--detach`` serve until SIGINT/SIGTERM, then delete the
    application (its replicas drain). Exit status 2 for bad flags or a missing extra."""
    from inferd.ray import deployment

    try:
        deployment.check_config(config)
        deployment.check_reachable(args.address)
        source, from_file = deployment.scaling_file(args.repository or "", config.model_base_path)
    except ConfigError as exc:
        print(f"inferd ray: {exc.message}", file=sys.stderr)
        return 2
    flags = {f.name: getattr(args, f.name) for f in fields(deployment.Scaling)}
    scaling = deployment.Scaling(**{**from_file, **{k: v for k, v in flags.items() if v is not None}})
    try:
        scaling.check("" if from_file else "--")
    except ConfigError as exc:
        print(
            f"inferd ray: {exc.message}" + (f" (flags over {source})" if from_file else ""), file=sys.stderr
        )
        return 2
    wait_s = args.scale_from_zero_wait_s
    if wait_s is not None:
        if not wait_s >= 0:
            print(f"inferd ray: --scale_from_zero_wait_s must be >= 0 seconds, got {wait_s}", file=sys.stderr)
            return 2
        os.environ[WAIT_ENV] = str(wait_s)  # for the proxies of a cluster this command starts
    host, port = deployment.deploy(
        config, scaling, args.address, config.host, config.rest_api_port, args.proxy
    )
    if (host, port) != (config.host, config.rest_api_port):
        print(
            f"inferd ray: Serve already listens on {host}:{port} on this cluster and keeps it; "
            "run 'serve shutdown' first to move it",
            file=sys.stderr,
        )
    print(f"inferd ray: serving on http://{host}:{port}", file=sys.stderr, flush=True)
    if args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    deployment.shutdown(local=not args.address)
    return 0
