"""``inferd ray serve``: the flags it adds to ``inferd serve``'s and what it runs. Imports no Ray
itself, so ``inferd --help`` works without the extra."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from inferd.config import ServerConfig
from inferd.errors import ConfigError

log = logging.getLogger(__name__)


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
    add("--num_replicas", type=int, default=0, help="a fixed number of replicas (default: autoscale)")
    add("--min_replicas", type=int, default=1, help="fewest replicas when autoscaling; 0 scales to zero")
    add("--max_replicas", type=int, default=1, help="most replicas when autoscaling")
    add(
        "--target_ongoing_requests",
        type=float,
        default=8.0,
        help="requests in flight per replica the autoscaler aims at (default: 8)",
    )
    add("--upscale_delay_s", type=float, default=2.0, help="seconds of overload before adding replicas")
    add("--downscale_delay_s", type=float, default=10.0, help="seconds of slack before removing replicas")
    add(
        "--graceful_shutdown_timeout_s",
        type=float,
        default=30.0,
        help="seconds a replica being removed may take to finish its requests",
    )
    add("--num_cpus", type=float, default=0.0, help="CPUs each replica reserves from Ray (default: 0)")
    add("--detach", action="store_true", help="deploy and exit, leaving the application running")


def main(args: argparse.Namespace) -> int:
    """Run ``inferd ray ACTION``."""
    if importlib.util.find_spec("ray") is None:
        print("inferd ray: Ray is not installed: pip install 'inferd[ray]'", file=sys.stderr)
        return 2
    if args.action == "status":
        from inferd.ray import deployment

        print(json.dumps(deployment.status(args.address), indent=1, sort_keys=True))
        return 0
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if hasattr(args, f.name)}
    values["memory_budget"] = ",".join(args.memory_budget or ())  # repeatable, as for inferd serve
    config = ServerConfig(**{k: v for k, v in values.items() if v is not None})
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
    from inferd.ray.deployment import Scaling

    scaling = Scaling(
        num_replicas=args.num_replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        upscale_delay_s=args.upscale_delay_s,
        downscale_delay_s=args.downscale_delay_s,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
        num_cpus=args.num_cpus,
    )
    try:
        scaling.check()
    except ConfigError as exc:
        print(f"inferd ray: {exc.message}", file=sys.stderr)
        return 2
    from inferd.ray import deployment

    deployment.deploy(config, scaling, args.address, config.host, config.rest_api_port, args.proxy)
    print(f"inferd ray: serving on http://{config.host}:{config.rest_api_port}", file=sys.stderr, flush=True)
    if args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    deployment.shutdown(local=not args.address)
    return 0
