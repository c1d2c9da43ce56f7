"""RequestLimits: built from the server config, checked at start, and each check names its flag."""

from __future__ import annotations

import pytest

from inferd.config import ServerConfig
from inferd.errors import ConfigError, InvalidArgument, ResourceExhausted
from inferd.protocols.limits import RequestLimits


def test_limits_come_from_the_server_config() -> None:
    limits = RequestLimits.of(ServerConfig(max_tensor_elements=5, max_json_depth=2, max_instances=3))
    assert (limits.max_tensor_elements, limits.max_json_depth, limits.max_instances) == (5, 2, 3)
    assert limits.elements("x", [1, 5]) == 5
    with pytest.raises(ConfigError, match="--max_json_depth must be <= 512"):
        RequestLimits.of(ServerConfig(max_json_depth=10_000))
    with pytest.raises(ConfigError, match="--max_string_bytes must be >= 1"):
        RequestLimits.of(ServerConfig(max_string_bytes=0))


def test_each_check_names_its_flag() -> None:
    limits = RequestLimits(max_tensor_elements=10, max_json_depth=2, max_string_bytes=3, max_instances=4)
    with pytest.raises(ResourceExhausted, match="--max_tensor_elements"):
        limits.elements("x", [0, 11])
    with pytest.raises(InvalidArgument, match="negative dim"):
        limits.elements("x", [-1])
    with pytest.raises(ResourceExhausted, match="--max_string_bytes"):
        limits.string("x", 4)
    with pytest.raises(ResourceExhausted, match="--max_instances"):
        limits.instances("instances", 5)
    with pytest.raises(InvalidArgument, match="--max_json_depth"):
        limits.depth("x", 3)
