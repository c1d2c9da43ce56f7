"""Tensor codecs that need nothing of the server, so that clients (``inferd bench``, a user's
own) can import them alone: the Open Inference Protocol's raw bytes (``from_raw``, ``to_raw``)
and TensorFlow's ``TensorProto`` (``decode_tensor``, ``encode_tensor``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any, cast

import numpy as np

from inferd._proto.tensor_pb2 import TensorProto
from inferd._proto.types_pb2 import DataType
from inferd.errors import InvalidArgument, ResourceExhausted
from inferd.protocols.limits import RequestLimits
from inferd.types import dtype_of, integer_range_error

_VALUES = {
    np.dtype(np.float32): "float_val",
    np.dtype(np.float64): "double_val",
    np.dtype(np.float16): "half_val",
    np.dtype(np.int8): "int_val",
    np.dtype(np.int16): "int_val",
    np.dtype(np.int32): "int_val",
    np.dtype(np.uint8): "int_val",
    np.dtype(np.uint16): "int_val",
    np.dtype(np.int64): "int64_val",
    np.dtype(np.uint32): "uint32_val",
    np.dtype(np.uint64): "uint64_val",
    np.dtype(np.bool_): "bool_val",
    np.dtype(object): "string_val",
}
"""numpy dtype -> the TensorProto field that holds its values when tensor_content is empty."""

VALUES_STEP = 65_536
"""Values of a repeated proto field read by one numpy call (``read_values``): about 3 ms of
float32 on the development machine, where one call over 15.7M of them (a 60 MiB ``float_val``)
held the GIL for 1.3 s."""


def read_values(values: Sequence[Any], dtype: np.dtype[Any]) -> np.ndarray:
    """A repeated numeric proto field (``float_val``, ``fp32_contents``, ...) as a flat ``dtype``
    array. Up to ``VALUES_STEP`` values are read in one call; more in steps of ``VALUES_STEP``
    with ``np.fromiter`` (2.7x faster than ``np.asarray`` on a large field), so that on a thread
    the GIL passes to the event loop between steps.

    Raises:
        OverflowError, ValueError: a value does not fit ``dtype`` (as ``np.asarray`` raises).
    """
    count = len(values)
    if count <= VALUES_STEP:
        return np.asarray(values, dtype=dtype)
    flat = np.empty(count, dtype=dtype)
    items = iter(values)
    for start in range(0, count, VALUES_STEP):
        flat[start : start + VALUES_STEP] = np.fromiter(items, dtype, min(VALUES_STEP, count - start))
    return flat


def write_values(field: Any, flat: np.ndarray) -> None:
    """Append the numbers of ``flat`` to a repeated proto field (``float_val``, ...), in steps of
    ``VALUES_STEP`` when there are more, so that on a thread the GIL passes to the event loop
    between steps (one call over a 60 MiB ``float_val`` held it for 0.65 s)."""
    if len(flat) <= VALUES_STEP:
        field.extend(flat.tolist())
        return
    for start in range(0, len(flat), VALUES_STEP):
        field.extend(flat[start : start + VALUES_STEP].tolist())


def all_text(value: Any) -> bool:
    """Whether every leaf of ``value`` (JSON lists that numpy read as text) is a string: numpy
    reads ``["a", 1]`` as text too, turning the number into ``"1"``."""
    return set(map(type, leaves(value))) <= {str}


TEXT_ARRAY_BYTES = 64 << 20
"""The largest numpy text array (``<U``, ``S``) a JSON value is read as, unless its request is
more than a sixteenth of that; a value that would pad to more is read as objects."""


SMALL_JSON = 4096
"""Bytes of JSON too few for a text array to swell: however many leaves they hold, their count
times the body's size, times 4, is under ``TEXT_ARRAY_BYTES`` (``text_swells``)."""


def may_hold_text(body: bytes, document: dict[str, Any]) -> bool:
    """Whether ``body``, the JSON of ``document``, may hold a string that could swell beside its
    keys and its ``signature_name``: a count of its quotes (a small body: none), so that
    ``text_swells`` looks at the values only of the requests where it might find one."""
    if len(body) <= SMALL_JSON:
        return False
    named = isinstance(document.get("signature_name"), str)
    return body.count(b'"') > 2 * (len(document) + named)


def text_swells(value: Any, size: int, room: int | None = None) -> bool:
    """Whether numpy would read JSON lists ``value``, from a request of ``size`` bytes, as a text
    array of more than ``room`` bytes (default: ``TEXT_ARRAY_BYTES`` or 16 times ``size``,
    whichever is more). numpy pads every element to the longest, 4 bytes a character, numbers
    among strings included (an integer takes 21 characters, a float 32): one long string among
    many short values takes their count times its length, and a 112 KB request took 1.1 GiB and
    2.7 s of the event loop. The leaves are looked at only when their count times ``size`` could
    come to that; lists that are not rectangular are left to numpy, which refuses them."""
    if room is None:
        room = max(TEXT_ARRAY_BYTES, 16 * size)
    count, item = 1, value
    while isinstance(item, list) and item:
        count *= len(item)
        item = item[0]
    if count * size * 4 <= room:
        return False
    try:
        kinds = set(map(type, leaves(value)))
        if str not in kinds and bytes not in kinds:
            return False
        text = (
            len(leaf) * (4 if type(leaf) is str else 1)
            for leaf in leaves(value)
            if type(leaf) in (str, bytes)
        )
        width = max(text)
    except TypeError:  # not rectangular: a number where a list was
        return False
    width = max(width, *(4 * _TEXT_WIDTHS.get(kind, 0) for kind in kinds))
    return count * width > room


_TEXT_WIDTHS = {bool: 5, int: 21, float: 32}
"""The characters numpy gives a JSON boolean, integer and number among strings."""


def may_hold_booleans(body: bytes, end: int) -> bool:
    """Whether the JSON in ``body[:end]`` may hold a boolean: a search of the bytes, so that
    ``first_boolean`` walks the values only of the requests where it might find one."""
    return body.find(b"true", 0, end) >= 0 or body.find(b"false", 0, end) >= 0


def first_boolean(value: Any) -> bool | None:
    """The first JSON boolean among the leaves of ``value`` (JSON lists of numbers), or None:
    numpy reads ``[1.5, true]`` as ``[1.5, 1.0]``. The leaves' types are gathered in C first (70
    ms for 4M numbers, a generator over them takes 210), and walked only when one is a bool."""
    if bool not in set(map(type, leaves(value))):
        return None
    return next(leaf for leaf in leaves(value) if type(leaf) is bool)


def leaves(value: Any) -> Iterable[Any]:
    """The leaves of ``value``, rectangular nested JSON lists (or one value), in order and
    without a copy."""
    if not isinstance(value, list):
        return (value,)
    found: Iterable[Any] = value
    first = value
    while first and isinstance(first[0], list):
        first = first[0]
        found = chain.from_iterable(found)
    return found


def _numbers(raw: bytes | memoryview, dtype: np.dtype[Any]) -> np.ndarray:
    """Little-endian ``raw`` as ``dtype`` numbers, without a copy; booleans with any byte but 0
    read as true (a copy then), as Triton reads them, where a model would read such a byte as
    neither (perf_analyzer's random data sends them)."""
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    if dtype.kind == "b" and (as_bytes := array.view(np.uint8)).max(initial=0) > 1:
        return np.not_equal(as_bytes, 0)
    return array


def from_raw(
    raw: bytes | memoryview, dtype: np.dtype[Any], count: int, name: str, source: str, limits: RequestLimits
) -> np.ndarray:
    """V2 raw tensor bytes (REST binary extension, gRPC raw contents) as a flat array of ``count``
    elements: numbers little-endian with no copy, BYTES as 4-byte-length-prefixed elements.

    Raises:
        InvalidArgument: the byte count does not fit ``count`` elements; ``source`` names the
            field that gave the size.
        ResourceExhausted: a BYTES element is over ``limits.max_string_bytes``.
    """
    if dtype.kind != "O":
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {name!r}: {count} elements of {dtype_of(dtype).v2} take "
                f"{count * dtype.itemsize} bytes, {source} says {len(raw)}"
            )
        return _numbers(raw, dtype)
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if len(items) == count:
            raise InvalidArgument(f"input {name!r}: shape needs {count} BYTES elements, the data has more")
        if pos + 4 > len(raw):
            raise InvalidArgument(f"input {name!r}: a BYTES element's 4-byte length is cut off")
        (length,) = struct.unpack_from("<I", raw, pos)
        limits.string(name, length)
        if pos + 4 + length > len(raw):
            raise InvalidArgument(f"input {name!r}: a BYTES element runs past the end of its data")
        items.append(bytes(raw[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    if len(items) != count:
        raise InvalidArgument(
            f"input {name!r}: shape needs {count} BYTES elements, the data has {len(items)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def _utf8(item: Any) -> bytes:
    """A string output element as bytes: ``bytes`` as they are, anything else as its text in
    UTF-8, a lone surrogate (which has none) as its ``\\uXXXX`` escape, as the JSON answers write it."""
    return item if isinstance(item, bytes) else str(item).encode("utf-8", "backslashreplace")


def to_raw(value: np.ndarray) -> bytes:
    """An output's V2 raw bytes: little-endian row-major numbers, or length-prefixed BYTES."""
    if value.dtype.kind in "OUS":
        parts = []
        for item in value.reshape(-1).tolist():
            data = _utf8(item)
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()


def decode_tensor(name: str, proto: TensorProto, max_bytes: int, limits: RequestLimits) -> np.ndarray:
    """A ``TensorProto`` as an ndarray (a read-only view of ``tensor_content`` when it has one).

    One typed value fills the shape, when that takes at most ``max_bytes``. The shape is checked
    against ``limits`` before anything is allocated.

    Raises:
        InvalidArgument: an unsupported dtype, a negative or unknown shape, or values that do not
            fill the shape; the message names the tensor.
        ResourceExhausted: one value would fill more than ``max_bytes``, or the shape or a string
            is over a limit.
    """
    try:
        dtype = dtype_of(DataType.Name(proto.dtype)).numpy
    except (KeyError, ValueError):
        label = DataType.Name(proto.dtype) if proto.dtype in DataType.values() else str(proto.dtype)
        raise InvalidArgument(f"input {name!r}: dtype {label} is not supported") from None
    tf_name = DataType.Name(proto.dtype)
    if proto.tensor_shape.unknown_rank:
        raise InvalidArgument(f"input {name!r}: tensor_shape has unknown_rank; give its dims")
    shape = tuple(dim.size for dim in proto.tensor_shape.dim)
    count = limits.elements(name, shape)
    content = proto.tensor_content  # a copy of the bytes at each read: read once
    if content:
        if dtype.kind == "O":
            raise InvalidArgument(f"input {name!r}: DT_STRING values go in string_val, not tensor_content")
        if len(content) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {name!r}: {tf_name} {list(shape)} takes {count * dtype.itemsize} bytes of "
                f"tensor_content, got {len(content)}"
            )
        return _numbers(content, dtype).reshape(shape)
    field = _VALUES[dtype]
    values = getattr(proto, field)
    try:
        if dtype.kind == "O":
            if values:
                limits.string(name, max(map(len, values)))
            flat = np.empty(len(values), dtype=object)
            flat[:] = list(values)
        elif field == "half_val":
            flat = read_values(values, np.dtype(np.uint16)).view(np.float16)
        elif field == "int_val":
            # int_val is int32 on the wire for DT_INT8/16/UINT8/16 too: range-check the narrowing.
            flat = read_values(values, np.dtype(np.int32))
            if (problem := integer_range_error(name, flat, dtype)) is not None:
                raise InvalidArgument(f"{problem} (in int_val)")
            flat = flat.astype(dtype, copy=False)
        else:
            flat = read_values(values, dtype)
    except (OverflowError, ValueError):
        raise InvalidArgument(f"input {name!r}: a value in {field} does not fit {tf_name}") from None
    if flat.size == count:
        return flat.reshape(shape)
    if flat.size == 1:
        if count * dtype.itemsize > max_bytes:
            raise ResourceExhausted(
                f"input {name!r}: filling {tf_name} {list(shape)} from one value would take "
                f"{count * dtype.itemsize} bytes, over the limit of {max_bytes} (--max_request_bytes)"
            )
        return np.full(shape, flat[0], dtype=dtype)
    raise InvalidArgument(
        f"input {name!r}: {tf_name} {list(shape)} needs {count} values in {field} (or 1 to fill the "
        f"shape), got {flat.size}"
    )


def data_type(dtype: np.dtype[Any]) -> DataType:
    """The TensorFlow ``DataType`` of a numpy dtype."""
    return cast(DataType, DataType.Value(dtype_of(dtype).tf))


def encode_tensor(proto: TensorProto, value: np.ndarray, tensor_content: bool = True) -> None:
    """Write ``value`` into ``proto``: strings as ``string_val``; numbers as ``tensor_content``,
    or with ``tensor_content`` false in their typed field (``float_val``, ``int64_val``, ...; FP16
    as its bit patterns in ``half_val``), as TF Serving answers by default."""
    proto.dtype = data_type(value.dtype)
    for size in value.shape:
        proto.tensor_shape.dim.add(size=size)
    if value.dtype.kind in "OUS":
        proto.string_val.extend(map(_utf8, value.reshape(-1).tolist()))
    elif tensor_content:
        proto.tensor_content = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
    elif value.dtype == np.float16:
        write_values(proto.half_val, value.reshape(-1).view(np.uint16))
    else:
        write_values(getattr(proto, _VALUES[value.dtype]), value.reshape(-1))
