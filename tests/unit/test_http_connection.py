"""ConnectionLimits: read from the server config, checked at start, 0 connections meaning auto."""

from __future__ import annotations

import resource

import pytest

from inferd.config import ServerConfig
from inferd.errors import ConfigError
from inferd.protocols.http_connection import (
    AUTO_CONNECTIONS_CAP,
    ConnectionLimits,
    auto_max_connections,
    raise_open_file_limit,
)


def test_limits_come_from_the_server_config() -> None:
    config = ServerConfig(max_connections=7, header_timeout_s=2.5, body_timeout_s=3.0, max_header_bytes=100)
    assert ConnectionLimits.of(config) == ConnectionLimits(7, 2.5, 3.0, 100)


def test_zero_connections_is_a_quarter_of_the_open_file_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = (
        AUTO_CONNECTIONS_CAP if soft == resource.RLIM_INFINITY else min(AUTO_CONNECTIONS_CAP, soft // 4)
    )
    assert auto_max_connections() == max(1, expected)
    assert ConnectionLimits.of(ServerConfig()).max_connections == auto_max_connections()


@pytest.mark.parametrize(
    ("config", "flag"),
    [
        (ServerConfig(max_connections=-1), "--max_connections"),
        (ServerConfig(header_timeout_s=0), "--header_timeout_s"),
        (ServerConfig(body_timeout_s=-1), "--body_timeout_s"),
        (ServerConfig(keep_alive_timeout_s=0), "--keep_alive_timeout_s"),
    ],
)
def test_bad_limits_name_their_flag(config: ServerConfig, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        ConnectionLimits.of(config)


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    # Raising the soft limit up to the hard one is always allowed, without privileges.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
    try:
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
