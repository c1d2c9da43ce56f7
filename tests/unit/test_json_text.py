"""JSON strings that numpy would pad to a huge text array are read as objects, with the checks
and errors of the text-array path: ragged lists, depth, mixed values, datatypes."""

from __future__ import annotations

import json
import math

import numpy as np
import orjson
import pytest

from inferd.config import ServerConfig
from inferd.errors import InvalidArgument
from inferd.protocols.codecs import SMALL_JSON, TEXT_ARRAY_BYTES, text_swells
from inferd.protocols.limits import RequestLimits
from inferd.protocols.v2_rest import _data_may_hold_text, decode_inputs
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


def test_limits_past_a_c_int_make_grpc_options_that_fit_one() -> None:
    """A message, metadata or connection limit of 2 GiB or more is no limit to gRPC; passed as it
    was, it made grpc.aio.server raise OverflowError and the server fail to start."""
    big = 3 * 2**30
    config = ServerConfig(max_request_bytes=big, max_inflight_bytes=big, max_header_bytes=big)
    options = grpc_transport_options(config, big)
    assert all(value <= 2**31 - 1 for _, value in options if isinstance(value, int))
    assert dict(options)["grpc.max_receive_message_length"] == 2**31 - 1


def test_v2_null_among_huge_strings_gets_the_error_of_the_numpy_path() -> None:
    with pytest.raises(InvalidArgument, match=r"datatype BYTES cannot hold JSON values like null \(null\)"):
        _v2([LONG] + ["a"] * 3_000 + [None], [3_002])


def test_v2_text_arrays_of_all_inputs_share_one_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 inputs of one 16,384-character string and 1,023 short ones: each text array is 64 MiB
    alone; only the first is made, the others are read as objects."""
    made: list[int] = []
    real = np.asarray

    def counting(value: object) -> np.ndarray:
        array = real(value)
        if array.dtype.kind == "U":
            made.append(array.nbytes)
        return array

    monkeypatch.setattr(np, "asarray", counting)
    entries = [
        {"name": f"t{i}", "datatype": "BYTES", "shape": [1_024], "data": ["x" * 16_384] + ["a"] * 1_023}
        for i in range(40)
    ]
    limits = RequestLimits.of(ServerConfig())
    tensors = decode_inputs(entries, memoryview(b""), limits, body_bytes=821_000)
    assert all(value.dtype == object and value[0] == "x" * 16_384 for value in tensors.values())
    assert len(made) == 1
    assert sum(made) <= TEXT_ARRAY_BYTES


def test_deeply_nested_parameters_beside_the_data_are_walked_without_recursion() -> None:
    deep: object = [0]
    for _ in range(900):
        deep = [deep]
    document = {
        "parameters": {"x": deep},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2_000], "data": [1.5] * 2_000}],
    }
    body = json.dumps(document).encode()
    assert len(body) > SMALL_JSON
    assert not _data_may_hold_text(body, len(body), orjson.loads(body))
    document["inputs"][0]["data"] = ["a"] + [1.5] * 1_999  # type: ignore[index]
    body = json.dumps(document).encode()
    assert _data_may_hold_text(body, len(body), orjson.loads(body))
