"""String outputs go out as UTF-8 in every encoding, a model's lone surrogate (which has no
UTF-8) as its ``\\uXXXX`` escape, as the JSON answers write it, rather than failing the call."""

from __future__ import annotations

import struct

import numpy as np

from inferd._proto.tensor_pb2 import TensorProto
from inferd.protocols.codecs import encode_tensor, to_raw
from inferd.protocols.tfserving_rest import _jsonable


def test_v2_raw_bytes_escape_a_lone_surrogate() -> None:
    value = np.array(["a\ud800b", b"\xff", "é"], dtype=object)
    parts = [b"a\\ud800b", b"\xff", "é".encode()]
    assert to_raw(value) == b"".join(struct.pack("<I", len(part)) + part for part in parts)


def test_tensor_proto_string_val_escapes_a_lone_surrogate() -> None:
    proto = TensorProto()
    encode_tensor(proto, np.array(["a\ud800b", "c"]))
    assert list(proto.string_val) == [b"a\\ud800b", b"c"]


def test_tf_serving_rest_writes_every_string_of_a_bytes_output_as_b64() -> None:
    """As TF Serving writes an output whose name ends in ``_bytes``, whether the model gave the
    values as bytes or as text; other outputs keep text as text."""
    value = np.array(["abc", b"\xff\x00", "a\ud800b"], dtype=object)
    assert _jsonable("echo_bytes", value) == [{"b64": "YWJj"}, {"b64": "/wA="}, {"b64": "YVx1ZDgwMGI="}]
    assert _jsonable("echo", value) == ["abc", {"b64": "/wA="}, "a\\ud800b"]
    assert _jsonable("echo_bytes", np.array(["abc"])) == [{"b64": "YWJj"}]
