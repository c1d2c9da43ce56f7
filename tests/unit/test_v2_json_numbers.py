"""JSON numbers of V2 REST tensors: every value a datatype holds is read exactly, and a value it
cannot hold is named in the error."""

from __future__ import annotations

import re

import numpy as np
import orjson
import pytest

from inferd.config import ServerConfig
from inferd.errors import InvalidArgument
from inferd.protocols.limits import RequestLimits
from inferd.protocols.v2_rest import decode_inputs

U64_MAX = 2**64 - 1


def _v2(data: list[object], datatype: str) -> np.ndarray:
    entry = {"name": "t", "datatype": datatype, "shape": [len(data)], "data": data}
    entry = orjson.loads(orjson.dumps(entry))  # as the server parses it
    return decode_inputs([entry], memoryview(b""), RequestLimits.of(ServerConfig()))["t"]


def test_uint64_values_past_int64_among_smaller_ones_are_read_exactly() -> None:
    # numpy reads [2**64 - 1, 0] as float64: the UINT64 tensor was refused (or would round).
    value = _v2([U64_MAX, 0, 2**63 + 1], "UINT64")
    assert value.dtype == np.uint64
    assert value.tolist() == [U64_MAX, 0, 2**63 + 1]
    assert _v2([], "UINT64").dtype == np.uint64


@pytest.mark.parametrize(
    ("data", "datatype", "fragment"),
    [
        ([1, 2**63], "INT64", "value 9223372036854775808 is out of range for INT64"),
        ([1, U64_MAX], "INT32", f"value {U64_MAX} is out of range for INT32"),
        ([U64_MAX, -1], "UINT64", "value -1 is out of range for UINT64"),
        ([-1, U64_MAX], "INT64", f"value {U64_MAX} is out of range for INT64"),
        ([U64_MAX, 1.5], "UINT64", "datatype UINT64 cannot hold JSON values like 1.5 (number)"),
        ([U64_MAX, True], "UINT64", "datatype UINT64 cannot hold JSON values like true (boolean)"),
    ],
)
def test_integers_out_of_range_are_named(data: list[object], datatype: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(fragment)):
        _v2(data, datatype)
