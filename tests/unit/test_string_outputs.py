"""String outputs go out as UTF-8 in every encoding, a model's lone surrogate (which has no
UTF-8) as its ``\\uXXXX`` escape, as the JSON answers write it, rather than failing the call."""

from __future__ import annotations

import struct

import numpy as np

from inferd._proto.tensor_pb2 import TensorProto
from inferd.protocols.codecs import encode_tensor, to_raw


def test_v2_raw_bytes_escape_a_lone_surrogate() -> None:
    value = np.array(["a\ud800b", b"\xff", "é"], dtype=object)
    parts = [b"a\\ud800b", b"\xff", "é".encode()]
    assert to_raw(value) == b"".join(struct.pack("<I", len(part)) + part for part in parts)


def test_tensor_proto_string_val_escapes_a_lone_surrogate() -> None:
    proto = TensorProto()
    encode_tensor(proto, np.array(["a\ud800b", "c"]))
    assert list(proto.string_val) == [b"a\\ud800b", b"c"]
