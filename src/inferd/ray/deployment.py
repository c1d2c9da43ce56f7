"""Deploys inferd as a Ray Serve application: the replica class, its autoscaling and its ingress.

Imports ray; only ``inferd.ray.command`` imports this module, and only once Ray is needed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import tempfile
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from inferd.config import SETTINGS_FILE, ServerConfig, model_location
from inferd.errors import ConfigError
from inferd.ray.cold_start import WAIT_ENV

APP_NAME = "inferd"

MODEL_HEADER = "serve_multiplexed_model_id"
"""The header (gRPC: metadata key) that names a request's model for routing: Serve's own."""

DRAINING_PERIOD_S = "5"
"""Seconds a removed replica stays reachable before it refuses new connections (``PROXY_ENV``)."""

PROXY_ENV = {
    # Serve's fallback proxy defaults to 8500, TF Serving's gRPC port: moved above it.
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "8510",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": "9510",
    # HAProxy retries a request on another replica when its replica closed the connection without
    # answering (killed): inferd's predictions are idempotent. Ray's default retries connection
    # failures only. Only requests that fit HAProxy's buffer (16 KiB by default) are replayed.
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    # A request naming its model in Serve's multiplexing header goes to the replica the model's
    # name hashes to, so that each model loads on one replica (under --memory_budget, lazily)
    # instead of on every replica that its requests happen to reach. HAProxy bypasses Serve's
    # own model-aware router; requests without the header are spread round robin.
    "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": f"hdr({MODEL_HEADER})",
    # HAProxy sends one log line per request to Serve's HAProxyManager actor, a Python process
    # that parses it into Serve's HTTP metrics: about 0.12 ms of CPU per request (measured with
    # bench/ray.py, one replica on 2 cores). inferd's own /metrics counts every request.
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    # A replica being removed stays reachable this long before it refuses new connections (Serve's
    # default: 30 s, meant for external load balancers). Serve's own HAProxy drops the replica from
    # its configuration within about a second of the controller's decision, and HAProxy retries a
    # refused connection on another replica; so scaling down frees the replica's memory and CPU in
    # seconds. Serve raises graceful_shutdown_timeout_s to at least this plus 5 s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": DRAINING_PERIOD_S,
    # Requests queued in front of the replicas (scaling up from zero) reach Serve's autoscaler
    # every second instead of every 10 s.
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    # Serve's proxies run inferd's HTTP middleware too: while no replica runs, a prediction
    # waits at most INFERD_SCALE_FROM_ZERO_WAIT_S seconds, then gets 503 with Retry-After
    # (cold_start.py). The replicas set the same callback in their own environment.
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "inferd.ray.ingress:middlewares",
    WAIT_ENV: "30",
}
"""Environment every Ray node's processes need (the Serve controller reads it at start)."""

REPLICA_ENV = {
    # Serve runs user code on a second event loop in its own thread by default, so that a
    # blocking call cannot stall the replica's own loop (health checks, its HTTP server).
    # inferd keeps its loop as free as it does in inferd serve (long work goes to its threads),
    # and the hop between the two loops, with both threads taking turns on the GIL, cost about
    # a third of a replica's throughput.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    # HTTP requests skip Serve's per-request wrapping once the replica is built (ingress.py).
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "inferd.ray.ingress:middlewares",
    # Each replica's requests in flight reach Serve's autoscaler every second (default: 10 s), so
    # that it reacts within upscale_delay_s plus about a second.
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    # The replica's own reachable window once removed (PROXY_ENV), even on a node started without
    # it: never longer than the controller, which reads it on its node, lets the replica live.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": DRAINING_PERIOD_S,
}
"""Environment of each replica's process, set through its Ray runtime environment."""

REPLICA_LOGGING = {
    # Serve logs every request at INFO (its access log) to a file and to stderr, which Ray's
    # log monitor tails: about a seventh of a busy replica's CPU in a profile. inferd serve
    # keeps no access log either; HAProxy's own (to syslog) remains.
    "log_level": "WARNING",
    "enable_access_log": False,
}
"""Serve's ``logging_config`` for the replicas (a Serve config file's deployment entry may set
another)."""


@dataclass(frozen=True)
class Scaling:
    """How many replicas run. ``num_replicas`` fixes the count; otherwise Serve's autoscaler keeps
    ``target_ongoing_requests`` in flight per replica (inferd's in-flight requests, queued rows
    included while they wait for a batch) and each replica's event-loop thread at most
    ``target_loop_utilization`` busy (``ScaleOnLoad``), between ``min_replicas`` and
    ``max_replicas``, reacting after ``upscale_delay_s`` / ``downscale_delay_s`` seconds (Serve's
    defaults: 30 s and 600 s)."""

    num_replicas: int = 0
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    target_loop_utilization: float = 0.7
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 10.0
    graceful_shutdown_timeout_s: float = 30.0
    num_cpus: float = 0.0

    def check(self, where: str = "--") -> None:
        """Raises ConfigError naming the value (``where`` + its name: a flag by default) when it
        is out of range, or when a fixed ``num_replicas`` comes with autoscaling bounds; NaN is out
        of every range, and an infinite ``num_cpus`` too."""
        if self.num_replicas < 0:
            raise ConfigError(f"{where}num_replicas must be >= 0, got {self.num_replicas}")
        if self.num_replicas and (self.min_replicas, self.max_replicas) != (1, 1):
            raise ConfigError(
                f"{where}num_replicas fixes the number of replicas; {where}min_replicas and "
                f"{where}max_replicas are the autoscaler's bounds: give one or the other"
            )
        if self.min_replicas < 0:
            raise ConfigError(f"{where}min_replicas must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(1, self.min_replicas):
            raise ConfigError(
                f"{where}max_replicas must be >= 1 and >= {where}min_replicas ({self.min_replicas}), "
                f"got {self.max_replicas}"
            )
        if not self.target_ongoing_requests > 0:
            raise ConfigError(
                f"{where}target_ongoing_requests must be > 0, got {self.target_ongoing_requests}"
            )
        if not 0 < self.target_loop_utilization <= 1:
            raise ConfigError(
                f"{where}target_loop_utilization must be > 0 and <= 1, got {self.target_loop_utilization}"
            )
        for name in ("upscale_delay_s", "downscale_delay_s", "graceful_shutdown_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{where}{name} must be >= 0 seconds, got {getattr(self, name)}")
        if not 0 <= self.num_cpus < math.inf:
            raise ConfigError(f"{where}num_cpus must be a number of CPUs >= 0, got {self.num_cpus}")

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``serve.deployment``."""
        options: dict[str, Any] = {
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": 0.2,
            "health_check_period_s": 2.0,
            "ray_actor_options": {"num_cpus": self.num_cpus, "runtime_env": {"env_vars": REPLICA_ENV}},
            "logging_config": REPLICA_LOGGING,
            # inferd sheds past --max_in_flight itself; Serve must not queue in front of it.
            "max_ongoing_requests": 100_000,
        }
        if self.num_replicas:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": 2.0,
                "policy": {
                    "policy_function": f"{__name__}:{ScaleOnLoad.__name__}",
                    "policy_kwargs": {"target_loop_utilization": self.target_loop_utilization},
                },
            }
        return options


TLS_SETTINGS = ("ssl_config_file", "tls_cert", "tls_key", "tls_ca", "tls_client_verify")
"""``inferd serve`` settings that cannot apply on Ray: Serve's ingress, not a replica, accepts
the connections, and it speaks plain HTTP and gRPC."""


def check_config(config: ServerConfig) -> None:
    """Raises ConfigError naming an ``inferd serve`` setting of ``config`` that cannot apply in a
    replica (TLS), rather than serving without it."""
    for name in TLS_SETTINGS:
        if getattr(config, name):
            raise ConfigError(
                f"--{name} does not apply on Ray: Serve's ingress accepts the connections, without TLS; "
                "terminate TLS in front of it (a load balancer or a Kubernetes ingress)"
            )


SCALING_TABLE = "ray"
"""The ``inferd.toml`` table (of a repository, or of the one model served) holding ``Scaling``
fields by name; ``inferd ray serve``'s flags override it."""


def scaling_from_toml(table: Any, where: str) -> dict[str, Any]:
    """``Scaling`` fields from an ``inferd.toml``'s ``[ray]`` table; ``where`` names it in errors.

    Raises:
        ConfigError: not a table, an unknown key or a value of the wrong type (ranges are
            checked once flags are merged in: ``Scaling.check``).
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {table!r}")
    defaults = Scaling()
    known = {f.name for f in fields(Scaling)}
    values: dict[str, Any] = {}
    for name, value in table.items():
        if name not in known:
            raise ConfigError(f"{where}: unknown key {name!r}; expected some of {sorted(known)}")
        kind = type(getattr(defaults, name))
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ConfigError(
                f"{where}: {name!r} must be {'a number' if kind is float else 'an integer'}, got {value!r}"
            )
        values[name] = kind(value)
    return values


def scaling_file(repository: str, model_base_path: str) -> tuple[str, dict[str, Any]]:
    """Where the ``[ray]`` table comes from and its ``Scaling`` fields: the ``inferd.toml`` at the
    root of ``repository`` (which holds nothing else), or else the one of ``model_base_path`` (the
    model's own settings); a local folder or an object store. ``("", {})`` without either or
    without a table.

    Raises:
        ConfigError: the file cannot be read, is not TOML, or its table is wrong.
    """
    root = repository or model_base_path
    if not root:
        return "", {}
    location = model_location(root)
    where = f"{location}/{SETTINGS_FILE}"
    try:
        if isinstance(location, Path):
            text = (location / SETTINGS_FILE).read_text(encoding="utf-8")
        else:
            text = _remote_text(where)
        raw = tomllib.loads(text)
    except FileNotFoundError:
        return "", {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if repository and set(raw) - {SCALING_TABLE}:
        extra = sorted(set(raw) - {SCALING_TABLE})
        raise ConfigError(
            f"{where}: unknown key(s) {extra}; a repository's inferd.toml holds [{SCALING_TABLE}]"
        )
    if SCALING_TABLE not in raw:
        return "", {}
    where = f"{where} [{SCALING_TABLE}]"
    return where, scaling_from_toml(raw[SCALING_TABLE], where)


def _remote_text(uri: str) -> str:
    """The object at ``uri`` as text. Raises FileNotFoundError when there is none."""
    from inferd.storage import ObjectStore

    store = ObjectStore(uri)
    if not store.exists(uri):
        raise FileNotFoundError(uri)
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / SETTINGS_FILE
        store.download_file(uri, local)
        return local.read_text(encoding="utf-8")


IN_FLIGHT = "inferd_in_flight"
"""A replica's autoscaling metric: inferd's requests in flight, from
``InferdReplica.record_autoscaling_stats``."""

LOOP_UTILIZATION = "inferd_loop_utilization"
"""A replica's autoscaling metric: the share of wall time (0 to 1) its event-loop thread spent on
the CPU, from ``InferdReplica.record_autoscaling_stats``."""

ANSWERED = "inferd_answered"
"""A replica's autoscaling metric: the requests it answered since its previous report."""


class ScaleOnLoad:
    """Serve's autoscaling policy for inferd (Serve applies the replica bounds, delays and factors
    around it): as many replicas as the larger of two needs.

    - Requests in flight at ``target_ongoing_requests`` each. In flight is the larger of inferd's
      own count (summed over the replicas, averaged over the look-back period), which sees every
      request, and Serve's, which also sees requests still queued in front of the replicas (the
      Python proxy's, or while scaling up from zero). This is the signal for models that take
      time: their requests wait in inferd, for a batch or a thread.
    - Event-loop utilization at ``target_loop_utilization`` each (summed over the replicas). A
      fast model's requests are parsed, computed and answered on the loop one after another, so
      inferd's count stays near 0 while the loop saturates and the queue grows in sockets and in
      HAProxy, where no count sees it; the loop's busy share does. It counts only while the
      replicas answer requests: without any, the loop's work is housekeeping (Serve's reports and
      health checks, inferd's repository polls), and idle replicas must scale down, to zero too.
    """

    def __init__(self, target_loop_utilization: float) -> None:
        self._target_loop_utilization = target_loop_utilization

    def __call__(self, context: Any) -> tuple[float, dict[str, Any]]:
        if context.current_num_replicas == 0:
            return context.target_num_replicas, {}
        metrics = context.aggregated_metrics or {}
        in_flight = max(sum(metrics.get(IN_FLIGHT, {}).values()), context.total_num_requests)
        answering = sum(metrics.get(ANSWERED, {}).values()) > 0
        busy = sum(metrics.get(LOOP_UTILIZATION, {}).values()) if answering else 0.0
        return max(
            in_flight / context.config.get_target_ongoing_requests(), busy / self._target_loop_utilization
        ), {}


def application(config: ServerConfig, scaling: Scaling) -> Any:
    """The Serve application: inferd's replica class with inferd's ASGI app as its ingress."""
    from ray import serve

    from inferd.ray.replica import InferdReplica

    deployment = serve.deployment(name=APP_NAME, **scaling.options())(serve.ingress()(InferdReplica))
    # Serve restarts every replica of a deployment given no version; with one, it restarts them
    # only when the version (or the replicas' resources) changes, and applies scaling in place.
    # Serve 2.60 takes a version only through this internal switch (its own config deploys use it).
    return deployment.options(version=code_version(config), _internal=True).bind(config)


def code_version(config: ServerConfig) -> str:
    """What the replicas run, as Serve's deployment version: inferd's version and every
    ``inferd serve`` setting, hashed (SHA-256, hex). ``Scaling`` is not part of it."""
    from inferd import __version__

    settings = [(f.name, getattr(config, f.name)) for f in fields(config)]  # tokens too: repr hides them
    return hashlib.sha256(f"{__version__} {settings!r}".encode()).hexdigest()


def app_builder(args: dict[str, Any]) -> Any:
    """Serve's application builder (``import_path: inferd.ray.deployment:app_builder`` in a Serve
    config file or a KubeRay RayService): ``args`` holds ``inferd serve`` flags and the
    ``Scaling`` fields by name, values as YAML gives them (strings are converted).

    Raises:
        ConfigError: a name that is neither, a value of the wrong kind, or TLS (``check_config``).
    """
    config_fields = {f.name: f for f in fields(ServerConfig)}
    scaling_fields = {f.name: f for f in fields(Scaling)}
    config: dict[str, Any] = {}
    scaling: dict[str, Any] = {}
    for name, value in args.items():
        target, known = (config, config_fields) if name in config_fields else (scaling, scaling_fields)
        if name not in known:
            raise ConfigError(
                f"application args: unknown {name!r}; expected inferd serve flags or {sorted(scaling_fields)}"
            )
        kind = type(getattr(ServerConfig() if target is config else Scaling(), name))
        try:
            target[name] = _convert(value, kind)
        except ValueError as exc:
            raise ConfigError(f"application args: {name!r} must be {kind.__name__}, got {value!r}") from exc
    ranges = Scaling(**scaling)
    ranges.check()
    server_config = ServerConfig(**config)
    check_config(server_config)
    return application(server_config, ranges)


def _convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind``. Raises ValueError when it is not one: a bool for a number, a
    fractional number for an integer (YAML's ``2.5`` is not 2 replicas)."""
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if kind is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if kind is bool and not isinstance(value, bool):
        raise ValueError(value)
    return kind(value)


def deploy(
    config: ServerConfig,
    scaling: Scaling,
    address: str,
    http_host: str,
    http_port: int,
    proxy: str,
) -> tuple[str, int]:
    """Connect to the cluster at ``address`` ("" starts a local one), start Serve's ingress on
    ``http_host:http_port`` (and gRPC on ``http_host:config.port`` unless it is 0) and deploy (or
    update in place) the inferd application; returns once every replica is up, with the host and
    port Serve's HTTP ingress listens on. Serve's ports are fixed when Serve first starts on a
    cluster: a later deploy with other ports keeps the first (and returns them)."""
    if proxy == "haproxy":
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    for name, value in PROXY_ENV.items():
        os.environ.setdefault(name, value)
    import ray
    from ray import serve

    # "local" starts a new one-node Ray, as documented (None would join a cluster found on this machine).
    ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=False)
    from inferd.ray.grpc_ingress import SERVICER_FUNCTIONS

    grpc_options = (
        {"port": config.port, "grpc_servicer_functions": SERVICER_FUNCTIONS} if config.port else None
    )
    serve.start(http_options={"host": http_host, "port": http_port}, grpc_options=grpc_options)
    serve.run(application(config, scaling), name=APP_NAME, route_prefix="/", blocking=False)
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    http = client.http_config if client is not None else None
    return (http.host, http.port) if http is not None else (http_host, http_port)


CONNECT_TIMEOUT_S = 5.0
"""How long ``check_reachable`` waits for a cluster's address to accept a connection."""


def check_reachable(address: str) -> None:
    """Raises ConfigError when ``address`` (``host:port`` of a cluster's head, or
    ``ray://host:port``) does not accept a TCP connection within ``CONNECT_TIMEOUT_S``: Ray's
    own connect waits and retries for minutes. "", ``auto``, ``local`` and other schemes are left
    to Ray."""
    target = urlsplit(address if "://" in address else f"//{address}")
    if address in ("", "auto", "local") or target.scheme not in ("", "ray"):
        return
    try:
        port = target.port
    except ValueError:
        port = None
    if not target.hostname or port is None:
        raise ConfigError(f"--address: expected host:port of a Ray cluster's head, got {address!r}")
    try:
        socket.create_connection((target.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"--address: no Ray cluster answers at {address} ({exc})") from None


def status(address: str) -> dict[str, Any]:
    """The inferd application's status, its replicas' counts by state (STARTING, RUNNING,
    STOPPING, ...), the replicas' ids and, in ``reports``, what each live replica serves
    (``admin_log.Follower.state``: versions, labels, split, rollout, by model).

    Raises:
        ConfigError: nothing answers at ``address`` (``check_reachable``).
    """
    check_reachable(address)
    import ray
    from ray import serve

    ray.init(address=address or None, logging_level=logging.WARNING, log_to_driver=False)
    app = serve.status().applications.get(APP_NAME)
    deployment = app.deployments.get(APP_NAME) if app else None
    prefix = f"SERVE_REPLICA::{APP_NAME}#{APP_NAME}#"
    return {
        "status": str(app.status) if app else "NOT_DEPLOYED",
        "replica_states": {str(k): v for k, v in deployment.replica_states.items()} if deployment else {},
        "replicas": sorted(
            actor["name"][len(prefix) :]
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(prefix)
        ),
        "reports": _reports(),
    }


def _reports() -> dict[str, Any]:
    import ray

    from inferd.ray import admin_log

    try:
        actor = ray.get_actor(admin_log.ACTOR_NAME, namespace=admin_log.NAMESPACE)
    except ValueError:  # no replica started yet
        return {}
    return dict(ray.get(actor.reports.remote(), timeout=30))


def shutdown(local: bool) -> None:
    """Delete the inferd application (its replicas drain) and disconnect; ``local``: also shut
    Serve down (its proxies and HAProxy, which ``ray stop`` leaves running) before the cluster
    this process started goes."""
    import ray
    from ray import serve

    from inferd.ray import admin_log

    if local:
        serve.shutdown()  # type: ignore[no-untyped-call]
    else:
        serve.delete(APP_NAME)
    admin_log.delete()  # the changes it holds were for the application just deleted
    ray.shutdown()
