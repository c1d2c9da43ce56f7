"""Malformed V2 REST requests are refused with InvalidArgument naming the field, however their
values are nested or typed, never with another exception (which answered 500)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferd.config import ServerConfig
from inferd.errors import InvalidArgument
from inferd.protocols import v2_rest
from inferd.protocols.limits import RequestLimits
from inferd.protocols.v2 import brief
from inferd.protocols.v2_triton import load_parameters

LIMITS = RequestLimits.of(ServerConfig())
DEEP = b"[" * 1000 + b"1" + b"]" * 1000
"""A list nested 1,000 levels: orjson reads it (up to 1,024); on Python 3.11 a whole repr or
json.dumps of it overflows the stack."""
SHOWN = "[" * 40 + "..."
"""What an error message shows of ``DEEP``: its first 40 characters."""


def _json(text: bytes) -> Any:
    return orjson.loads(text.replace(b"DEEP", DEEP))


def _decode(entry: bytes, binary: bytes = b"") -> dict[str, np.ndarray]:
    return v2_rest.decode_inputs([_json(entry)], memoryview(binary), LIMITS)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (b'{"name": "x", "shape": [1], "datatype": DEEP, "data": [1]}', f"unknown datatype {SHOWN};"),
        (
            b'{"name": "x", "shape": [1], "datatype": "FP32", "data": [{"a": DEEP}]}',
            'like {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[... (object)',
        ),
        (b'{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a", {"a": DEEP}]}', 'like {"a": [[[['),
        (
            b'{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": DEEP}}',
            f"binary_data_size must be a byte count (an integer >= 0), got {SHOWN}",
        ),
    ],
)
def test_inputs_nested_past_the_stack_are_a_400(entry: bytes, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        _decode(entry)
    assert fragment in error.value.message


@pytest.mark.parametrize(
    "doc",
    [
        b'{"parameters": {"binary_data_output": DEEP}}',
        b'{"outputs": [{"name": "y", "parameters": {"binary_data": DEEP}}]}',
        b'{"outputs": [{"name": DEEP}]}',
    ],
)
def test_output_parameters_nested_past_the_stack_are_a_400(doc: bytes) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(SHOWN)):
        v2_rest._wanted(_json(doc), ["y"])


def test_repository_values_nested_past_the_stack_are_a_400() -> None:
    index = v2_rest._repository(None, "POST", "/v2/repository/index", b'{"ready": ' + DEEP + b"}")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=re.escape(f"'ready' must be true or false, got {SHOWN}")):
        asyncio.run(index)
    for config in (b'{"name": DEEP}', b'{"max_batch_size": DEEP}'):
        with pytest.raises(InvalidArgument, match=re.escape(SHOWN)):
            load_parameters("m", {"config": config.replace(b"DEEP", DEEP).decode()})


def test_a_long_value_is_cut_in_the_message() -> None:
    assert brief("x" * 100) == "'" + "x" * 39 + "..."
    assert len(brief(list(range(1000)))) == 43


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=30) | st.dictionaries(st.text(max_size=50), inner, max_size=30),
    max_leaves=200,
)


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_a_brief_value_is_the_start_of_its_whole_rendering(value: Any) -> None:
    for render in (repr, json.dumps):
        whole = render(value)
        assert brief(value, render) == (whole if len(whole) <= 40 else whole[:40] + "...")


def test_a_huge_value_is_rendered_only_as_far_as_the_message_shows() -> None:
    rendered: list[int] = []

    def render(value: Any) -> str:
        text = repr(value)
        rendered.append(len(text))
        return text

    wide = [[i, "x" * 1000, {"k" * 1000: list(range(100))}] for i in range(10_000)]
    assert brief(wide, render) == repr(wide)[:40] + "..."
    assert rendered[0] < 1000  # not the whole value's millions of characters


def test_binary_data_size_must_be_an_integer_not_a_boolean() -> None:
    # true was read as 1: a one-byte BOOL input was decoded from it
    entry = b'{"name": "x", "shape": [1], "datatype": "BOOL", "parameters": {"binary_data_size": true}}'
    with pytest.raises(InvalidArgument, match=r"binary_data_size must be a byte count .* got True"):
        _decode(entry, b"\x01")
    with pytest.raises(InvalidArgument, match=r"binary_data_size must be a byte count .* got '1'"):
        _decode(entry.replace(b"true", b'"1"'), b"\x01")


def test_data_nested_past_numpy_dimensions_names_the_depth_limit() -> None:
    # numpy refuses more than 64 dimensions, which read as "ragged" before the depth was checked
    deep: object = [1.0]
    for _ in range(80):
        deep = [deep]
    entry = {"name": "x", "shape": [1], "datatype": "FP32", "data": deep}
    with pytest.raises(InvalidArgument, match="--max_json_depth"):
        v2_rest.decode_inputs([entry], memoryview(b""), LIMITS)
    with pytest.raises(InvalidArgument, match="'data' is ragged"):
        v2_rest.decode_inputs([{**entry, "data": [[1.0], 2.0]}], memoryview(b""), LIMITS)


def test_a_header_length_of_zero_is_named_as_the_raw_binary_request() -> None:
    with pytest.raises(InvalidArgument, match="raw binary request"):
        v2_rest.split_body("0", np.zeros(4, np.float32).tobytes())
