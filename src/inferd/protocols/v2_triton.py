"""What Triton's clients expect of the Open Inference Protocol beyond its core, for both V2
adapters: the statistics extension's document, the parameters of a model repository load (a
config override; ``file:`` models are refused), and Triton's wording for an unknown model and a
failed load, which tritonclient's examples match.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from inferd.control import SettingsOverride
from inferd.errors import InferdError, InvalidArgument, NotFound
from inferd.protocols.v2 import brief
from inferd.service import InferenceService
from inferd.statistics import Duration, VersionStatistics
from inferd.types import ModelRef

CONFIG_KEYS = ("name", "max_batch_size", "dynamic_batching")
"""The keys of Triton's model configuration that a load's config override may carry."""
_DYNAMIC_BATCHING_KEYS = ("max_queue_delay_microseconds",)


def _duration(duration: Duration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


def statistics_document(versions: list[VersionStatistics]) -> dict[str, Any]:
    """Triton's ``{"model_stats": [...]}`` for ``versions`` (the JSON names of its
    ModelStatisticsResponse; integers as JSON numbers, as Triton's HTTP endpoint writes them)."""
    stats = []
    for version in versions:
        stats.append(
            {
                "name": version.model_id.name,
                "version": str(version.model_id.version),
                "last_inference": version.last_inference_ms,
                "inference_count": version.inference_count,
                "execution_count": version.execution_count,
                "inference_stats": {
                    "success": _duration(version.success),
                    "fail": _duration(version.fail),
                    "queue": _duration(version.queue),
                    "compute_input": _duration(version.compute_input),
                    "compute_infer": _duration(version.compute_infer),
                    "compute_output": _duration(version.compute_output),
                    "cache_hit": _duration(Duration()),
                    "cache_miss": _duration(Duration()),
                },
                "batch_stats": [
                    {
                        "batch_size": batch.batch_size,
                        "compute_input": _duration(batch.compute_input),
                        "compute_infer": _duration(batch.compute_infer),
                        "compute_output": _duration(batch.compute_output),
                    }
                    for _, batch in sorted(version.batches.items())
                ],
            }
        )
    return {"model_stats": stats}


def statistics(service: InferenceService, name: str, version: str) -> dict[str, Any]:
    """The statistics document of model ``name`` (every model when empty) at ``version`` (every
    AVAILABLE version when empty).

    Raises:
        NotFound: in Triton's words, when the model or version is not served.
        InvalidArgument: ``version`` without ``name``, or not a number.
    """
    if version and not name:
        raise InvalidArgument("a version needs a model name")
    if version and not (version.isascii() and version.isdigit() and len(version) <= 19):
        shown = version if len(version) <= 40 else f"{version[:40]}..."
        raise InvalidArgument(f"model version must be a number of at most 19 digits, got {shown!r}")
    number = int(version) if version else None
    try:
        return statistics_document(service.statistics(name or None, number))
    except NotFound as error:
        raise unknown_model(service, name, version, error) from None


def unknown_model(service: InferenceService, name: str, version: str | None, error: NotFound) -> NotFound:
    """``error`` in Triton's words when ``name`` is no served model, or ``version`` none of its
    versions (``Request for unknown model: 'x' is not found``); otherwise ``error``."""
    if not service.knows(name):
        return NotFound(f"Request for unknown model: '{name}' is not found")
    if version:
        try:
            known = {str(s.version) for s in service.status(ModelRef(name))}
        except NotFound:
            known = set()
        if version.lstrip("0") not in known:
            return NotFound(f"Request for unknown model: '{name}' version {version} is not found")
    return error


def load_failure(name: str, error: InferdError) -> InferdError:
    """``error`` with Triton's ``failed to load 'NAME'`` prefix, same kind (so same status)."""
    if error.message.startswith("failed to load"):
        return error
    if isinstance(error, NotFound):
        message = f"failed to load '{name}', failed to poll from model repository: {error.message}"
    else:
        message = f"failed to load '{name}': {error.message}"
    return type(error)(message)


def load_parameters(name: str, parameters: Mapping[str, Any]) -> SettingsOverride | None:
    """The override a load of model ``name`` asks for in its ``parameters``: ``config``, the JSON
    text of a Triton model configuration with only ``CONFIG_KEYS`` (integers as numbers or
    decimal strings, as protobuf's JSON allows). None without ``config`` or with one that sets
    nothing.

    Raises:
        InvalidArgument: ``file:`` parameters (inferd loads models from its repository only), a
            config that is not a JSON object, or a key inferd does not honour; names it.
    """
    files = sorted(key for key in parameters if key.startswith("file:"))
    if files:
        shown = [key if len(key) <= 64 else key[:61] + "..." for key in files]
        raise InvalidArgument(
            f"failed to poll from model repository: load parameters {shown} are not supported; "
            "inferd loads a model from its folder in the repository"
        )
    text = parameters.get("config")
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if not isinstance(text, str):
        raise InvalidArgument("parameter 'config' must be the JSON text of a model configuration")
    try:
        config = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"parameter 'config' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgument("parameter 'config' must be a JSON object")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise InvalidArgument(
            f"config keys {unknown} are not supported; inferd honours {list(CONFIG_KEYS)} "
            "(with dynamic_batching.max_queue_delay_microseconds); set the rest in inferd.toml"
        )
    if "name" in config and config["name"] != name:
        raise InvalidArgument(f"config 'name' {brief(config['name'])} is not the model's name {name!r}")
    max_batch_size = _integer(config, "max_batch_size", 1) if "max_batch_size" in config else None
    delay = None
    batching = config.get("dynamic_batching")
    if batching is not None:
        if not isinstance(batching, dict):
            raise InvalidArgument("config 'dynamic_batching' must be an object")
        extra = sorted(set(batching) - set(_DYNAMIC_BATCHING_KEYS))
        if extra:
            raise InvalidArgument(
                f"config dynamic_batching keys {extra} are not supported; inferd honours "
                f"{list(_DYNAMIC_BATCHING_KEYS)}"
            )
        if "max_queue_delay_microseconds" in batching:
            delay = _integer(batching, "max_queue_delay_microseconds", 0)
    if max_batch_size is None and delay is None:
        return None
    return SettingsOverride(max_batch_size=max_batch_size, batch_timeout_micros=delay)


def _integer(table: Mapping[str, Any], key: str, least: int) -> int:
    value = table[key]
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value < 2**31:
        raise InvalidArgument(f"config '{key}' must be an integer >= {least}, got {brief(table[key])}")
    return value
