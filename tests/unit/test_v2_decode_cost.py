"""Where a V2 REST body is decoded is decided by what decoding it costs: the JSON part of a body
with binary number tensors, the whole body when binary BYTES elements must be split."""

from __future__ import annotations

import json

from inferd.protocols.decoding import LARGE_BODY_BYTES
from inferd.protocols.v2_rest import _decode_cost


def body(datatype: str, binary: int) -> tuple[str, bytes]:
    head = json.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": datatype, "shape": [1], "parameters": {"binary_data_size": binary}}
            ]
        }
    ).encode()
    return str(len(head)), head + b"\0" * binary


def test_binary_numbers_count_only_their_json_header() -> None:
    length, raw = body("FP32", 4 * LARGE_BODY_BYTES)
    assert _decode_cost(length, raw) == int(length) < LARGE_BODY_BYTES


def test_binary_strings_count_the_whole_body_also_when_their_datatype_is_escaped() -> None:
    for datatype in ("BYTES", "bytes", "\\u0042YTES"):
        length, raw = body("FP32", 4 * LARGE_BODY_BYTES)
        raw = raw.replace(b'"FP32"', b'"' + datatype.encode() + b'"')
        length = str(int(length) + len(datatype) - 4)
        assert _decode_cost(length, raw) == len(raw)


def test_a_missing_or_bad_header_length_counts_the_whole_body() -> None:
    _, raw = body("FP32", 100)
    for length in (None, "x", "-1"):
        assert _decode_cost(length, raw) == len(raw)
