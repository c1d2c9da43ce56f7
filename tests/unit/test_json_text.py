"""JSON strings that numpy would pad to a huge text array are read as objects, with the checks
and errors of the text-array path: ragged lists, depth, mixed values, datatypes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inferd.config import ServerConfig
from inferd.errors import InvalidArgument
from inferd.protocols.codecs import TEXT_ARRAY_BYTES, text_swells
from inferd.protocols.limits import RequestLimits
from inferd.protocols.v2_rest import decode_inputs
from inferd.server import grpc_transport_options

LONG = "x" * 100_000
SIZE = 112_000  # about the JSON of [LONG] + ["a"] * 3_000


def test_one_long_string_among_many_values_swells_and_short_ones_do_not() -> None:
    assert text_swells([LONG] + ["a"] * 3_000, SIZE)
    assert not text_swells(["ab"] * 3_000, SIZE)
    assert not text_swells([LONG, "a"], SIZE)  # two elements: 800 KB
    # numbers among strings take numpy's width for them: 21 characters an integer, 32 a float
    assert text_swells(["a"] + [1.5] * 600_000, 4_000_000)
    assert not text_swells([1.5] * 600_000, 4_000_000)
    assert not text_swells([LONG] + ["a"] * 3_000, 0)  # a body with no string in its data
    assert text_swells(["ab"] * 3_000, SIZE, room=1_000)  # the room the request has left


def test_lists_that_are_not_rectangular_are_left_to_numpy() -> None:
    assert not text_swells([[LONG] + ["a"] * 3_000, 5], SIZE)
    with pytest.raises(ValueError, match="inhomogeneous"):
        np.asarray([[LONG] + ["a"] * 3_000, 5])  # which refuses them without a text array


def _v2(data: object, shape: list[int], datatype: str = "BYTES") -> dict[str, np.ndarray]:
    limits = RequestLimits.of(ServerConfig())
    entry = {"name": "t", "datatype": datatype, "shape": shape, "data": data}
    return decode_inputs([entry], memoryview(b""), limits, body_bytes=SIZE)


def test_v2_strings_read_as_objects_keep_the_checks_of_a_text_array() -> None:
    (value,) = _v2([LONG] + ["a"] * 3_000, [3_001]).values()
    assert value.dtype == object
    assert value[0] == LONG
    assert value.shape == (3_001,)
    with pytest.raises(InvalidArgument, match="'data' is ragged"):
        _v2([[LONG] + ["a"] * 3_000, "abc"], [3_004])
    deep: object = [LONG] + ["a"] * 3_000
    for _ in range(40):
        deep = [deep]
    with pytest.raises(InvalidArgument, match="--max_json_depth"):
        _v2(deep, [3_001])
    with pytest.raises(InvalidArgument, match="'data' mixes strings with other JSON values"):
        _v2([LONG] + [1] * 3_000, [3_001])
    with pytest.raises(InvalidArgument, match="shape needs 5 elements"):
        _v2([LONG] + ["a"] * 3_000, [5])
    with pytest.raises(InvalidArgument, match="datatype FP32 cannot hold"):
        _v2([LONG] + ["a"] * 3_000, [3_001], "FP32")
    assert 3_001 * len(LONG) * 4 > TEXT_ARRAY_BYTES  # these would have been text arrays


@pytest.mark.parametrize("timeout_s", [math.inf, 1e12, 1e-9])
def test_any_header_timeout_makes_grpc_options_that_fit_a_c_int(timeout_s: float) -> None:
    options = dict(grpc_transport_options(ServerConfig(header_timeout_s=timeout_s), 10))
    for key in ("grpc.server_handshake_timeout_ms", "grpc.http2.settings_timeout"):
        assert isinstance(options[key], int)
        assert 1 <= options[key] <= 2**31 - 1
