"""Property tests: the request decoders and the model config parser, fed arbitrary and
half-valid input, either decode it or raise one of inferd's own errors (InferdError), never
anything else; and what they decode stays within the request limits."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferd._proto import grpc_service_pb2 as v2_pb
from inferd._proto import model_server_config_pb2 as config_pb
from inferd._proto import prediction_service_pb2 as ps
from inferd._proto.example_pb2 import Example
from inferd._proto.tensor_pb2 import TensorProto
from inferd._proto.types_pb2 import DataType
from inferd.config import ServerConfig, models_from_proto, parse_model_config, read_model_config_file
from inferd.errors import ConfigError, InferdError, InvalidArgument
from inferd.protocols import tfserving_grpc, v2_grpc
from inferd.protocols.codecs import decode_tensor, from_raw
from inferd.protocols.limits import RequestLimits
from inferd.protocols.tfserving_rest import TensorDecoder, parse_json
from inferd.protocols.v2 import V2_DATATYPES
from inferd.protocols.v2_rest import decode_inputs, split_body
from inferd.types import Signature, TensorSpec, dtype_of

LIMITS = RequestLimits(max_tensor_elements=4096, max_json_depth=8, max_string_bytes=64, max_instances=50)
"""Small limits, so that generated input crosses them often."""
DEFAULTS = RequestLimits.of(ServerConfig())

FUZZ = settings(
    max_examples=int(os.environ.get("INFERD_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
"""Cases per property; INFERD_HYPOTHESIS_EXAMPLES raises it for a longer run."""

ONE_INPUT = Signature("serving_default", (TensorSpec("x", np.dtype(np.float32), (-1, 4)),), ())
TWO_INPUTS = Signature(
    "serving_default",
    (TensorSpec("a", np.dtype(np.float32), (-1, 3)), TensorSpec("b", np.dtype(np.int64), (-1, 1))),
    (),
)

PARSER = Signature("serving_default", (TensorSpec("inputs", np.dtype(object), (-1,)),), ())
"""A tf.Example parser's signature (one string input): JSON features become serialized Examples."""

names = st.sampled_from(["x", "a", "b", "b64", "s", ""]) | st.text(max_size=4)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(names, inner, max_size=3),
    max_leaves=40,
)


def nested_lists(depth: int) -> Any:
    value: Any = 1.0
    for _ in range(depth):
        value = [value]
    return value


tensor_values = st.one_of(
    json_values,
    st.lists(st.lists(st.floats(allow_nan=False, width=32), min_size=4, max_size=4), min_size=1, max_size=4),
    st.integers(min_value=0, max_value=40).map(nested_lists),
    st.lists(st.fixed_dictionaries({"b64": st.sampled_from(["AAEC", "YWJj", "not base64!", "A" * 120])})),
)


def decodes_or_refuses(call: Any, *args: Any) -> Any:
    """Run ``call``; only an InferdError may come out of it. Returns the result, or None."""
    try:
        return call(*args)
    except InferdError:
        return None


def within(tensors: dict[str, np.ndarray] | None, limits: RequestLimits) -> None:
    for array in (tensors or {}).values():
        assert isinstance(array, np.ndarray)
        assert array.size <= limits.max_tensor_elements
        assert array.ndim <= limits.max_json_depth
        if array.dtype.kind == "O":
            assert all(len(item) <= limits.max_string_bytes * 4 for item in array.flat)


# --- TF Serving REST (v1) ----------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_v1_body_parses_or_refuses(body: bytes) -> None:
    doc = decodes_or_refuses(parse_json, body)
    assert doc is None or isinstance(doc, dict)


@FUZZ
@given(tensor_values, st.sampled_from([ONE_INPUT, TWO_INPUTS]), st.booleans())
def test_v1_rows_and_columns_decode_or_refuse(value: Any, signature: Signature, rows: bool) -> None:
    decoder = TensorDecoder(LIMITS)
    tensors = decodes_or_refuses(decoder.rows if rows else decoder.columns, signature, value)
    within(tensors, LIMITS)


@FUZZ
@given(
    st.lists(st.dictionaries(names, tensor_values, max_size=3) | json_values, min_size=1, max_size=60),
    st.dictionaries(names, tensor_values, max_size=2),
    st.sampled_from([ONE_INPUT, TWO_INPUTS, PARSER]),
)
def test_v1_examples_decode_or_refuse(
    examples: list[Any], context: dict[str, Any], signature: Signature
) -> None:
    tensors = decodes_or_refuses(TensorDecoder(LIMITS).examples, signature, examples, context)
    within(tensors, LIMITS)


@pytest.mark.filterwarnings("error::DeprecationWarning")  # protobuf's, for a bool in int64_list
def test_v1_json_features_become_tf_servings_example_features() -> None:
    """As TF Serving reads them: strings as UTF-8 bytes, booleans as int64 1 and 0, an empty
    list as a feature of no kind (not an empty int64_list, which a float feature's parser
    refuses); an integer past int64 or a lone surrogate is refused naming the feature (both
    were a 500)."""
    examples = [{"s": ["é", {"b64": "AP8="}], "flag": [True, False], "n": 2**63 - 1, "none": []}]
    (serialized,) = TensorDecoder(DEFAULTS).examples(PARSER, examples, {"c": "ctx"})["inputs"]
    features = Example.FromString(serialized).features.feature
    assert "none" in features
    assert features["none"].WhichOneof("kind") is None  # parsed as absent: a default, no error
    assert list(features["s"].bytes_list.value) == ["é".encode(), b"\x00\xff"]
    assert list(features["c"].bytes_list.value) == [b"ctx"]
    assert list(features["flag"].int64_list.value) == [1, 0]
    assert list(features["n"].int64_list.value) == [2**63 - 1]
    for feature, match in ((2**63, "Feature: x has an integer outside int64"), ("\ud800", "'x'.*surrogate")):
        with pytest.raises(InvalidArgument, match=match):
            TensorDecoder(DEFAULTS).examples(PARSER, [{"x": feature}], {})


def test_v1_a_feature_of_nested_lists_is_refused_naming_its_types() -> None:
    """Not by its repr, which raised RecursionError (a 500) for lists as deep as JSON allows."""
    for value, got in ((nested_lists(1020), "got list"), ([1.5, "a", None], "got null, number, string")):
        with pytest.raises(InvalidArgument, match=f"feature 'x': expected .* values of one kind, {got}$"):
            TensorDecoder(DEFAULTS).examples(PARSER, [{"x": value}], {})


def test_v1_limits_name_their_flags() -> None:
    decoder = TensorDecoder(LIMITS)
    for value, flag in (
        ([[1.0] * 4] * 51, "--max_instances"),
        (nested_lists(9), "--max_json_depth"),
        (["a" * 65], "--max_string_bytes"),
        ([[1.0] * 4] * 1025, "--max_instances"),
    ):
        with pytest.raises(InferdError, match=flag):
            decoder.rows(ONE_INPUT, value)
    with pytest.raises(InferdError, match="--max_tensor_elements"):
        decoder.columns(ONE_INPUT, [[1.0] * 4] * 1025)


# --- Open Inference Protocol (V2) REST, JSON and binary ---------------------------------------

shapes = st.lists(
    st.integers(min_value=0, max_value=6) | st.integers(min_value=-2, max_value=2**64), max_size=4
)
v2_entries = st.fixed_dictionaries(
    {"name": names, "shape": shapes | json_values, "datatype": st.sampled_from(V2_DATATYPES) | names},
    optional={
        "data": tensor_values | st.lists(st.floats(allow_nan=False), max_size=12),
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 40) | json_values})
        | json_values,
    },
)


@FUZZ
@given(st.lists(v2_entries, max_size=3) | json_values, st.binary(max_size=40))
def test_v2_inputs_decode_or_refuse(entries: Any, binary: bytes) -> None:
    tensors = decodes_or_refuses(decode_inputs, entries, memoryview(binary), LIMITS)
    within(tensors, LIMITS)


@FUZZ
@given(
    st.none() | st.text(max_size=4) | st.integers(-3, 300).map(str),
    st.binary(max_size=100)
    | st.lists(v2_entries, max_size=2).map(lambda e: json.dumps({"inputs": e}).encode()),
    st.binary(max_size=40),
)
def test_v2_binary_body_splits_or_refuses(header_length: str | None, header: bytes, tail: bytes) -> None:
    split = decodes_or_refuses(split_body, header_length, header + tail)
    if split is not None:
        doc, binary = split
        within(decodes_or_refuses(decode_inputs, doc.get("inputs"), binary, LIMITS), LIMITS)


@FUZZ
@given(
    st.binary(max_size=64),
    st.sampled_from(V2_DATATYPES),
    st.integers(min_value=0, max_value=20),
)
def test_raw_tensor_bytes_decode_or_refuse(raw: bytes, datatype: str, count: int) -> None:
    array = decodes_or_refuses(from_raw, raw, dtype_of(datatype).numpy, count, "x", "test", LIMITS)
    if array is not None:
        assert array.size == count


def test_boolean_bytes_other_than_0_read_as_true() -> None:
    """As Triton reads them; a model would read a byte of 2 as neither (onnxruntime's Not(2) is
    true), and perf_analyzer's random data sends such bytes."""
    boolean = np.dtype(np.bool_)
    read = from_raw(bytes([0, 1, 2, 255]), boolean, 4, "x", "raw_input_contents", LIMITS)
    assert read.tolist() == [False, True, True, True]
    assert read.view(np.uint8).tolist() == [0, 1, 1, 1]
    proto = TensorProto(dtype=DataType.DT_BOOL, tensor_content=bytes([255, 0]))
    proto.tensor_shape.dim.add(size=2)
    decoded = decode_tensor("x", proto, 1024, LIMITS)
    assert decoded.view(np.uint8).tolist() == [1, 0]


def test_v2_huge_declared_shapes_are_refused_before_allocation() -> None:
    for shape in ([2**32, 2**32], [0, 2**62], [2**40], [1] * 33):
        entry = {"name": "x", "datatype": "FP32", "shape": shape, "data": []}
        with pytest.raises(InferdError, match=r"--max_tensor_elements|at most 32"):
            decode_inputs([entry], memoryview(b""), DEFAULTS)


# --- gRPC: TF Serving TensorProto and V2 ModelInferRequest ------------------------------------


@st.composite
def tensor_protos(draw: st.DrawFn) -> TensorProto:
    proto = TensorProto(dtype=draw(st.sampled_from(list(DataType.values()))))
    for size in draw(st.lists(st.integers(min_value=-1, max_value=2**40) | st.integers(0, 5), max_size=4)):
        proto.tensor_shape.dim.add(size=size)
    proto.tensor_shape.unknown_rank = draw(st.booleans())
    proto.tensor_content = draw(st.binary(max_size=48))
    proto.float_val.extend(draw(st.lists(st.floats(width=32), max_size=6)))
    proto.int_val.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6)))
    proto.int64_val.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)))
    proto.string_val.extend(draw(st.lists(st.binary(max_size=80), max_size=3)))
    proto.half_val.extend(draw(st.lists(st.integers(0, 2**31 - 1), max_size=3)))
    return proto


@FUZZ
@given(tensor_protos())
def test_tfserving_tensor_proto_decodes_or_refuses(proto: TensorProto) -> None:
    array = decodes_or_refuses(decode_tensor, "x", proto, 4096, LIMITS)
    within(None if array is None else {"x": array}, LIMITS)


@FUZZ
@given(st.lists(st.dictionaries(names, st.lists(st.floats(width=32), max_size=4), max_size=3), max_size=60))
def test_tfserving_grpc_examples_decode_or_refuse(rows: list[dict[str, list[float]]]) -> None:
    request = ps.ClassificationRequest()
    for row in rows:
        example = request.input.example_list.examples.add()
        for key, values in row.items():
            example.features.feature[key].float_list.value.extend(values)
    result = decodes_or_refuses(tfserving_grpc.examples_to_inputs, ONE_INPUT, request.input, LIMITS)
    if result is not None:
        within(result[0], LIMITS)


@st.composite
def infer_requests(draw: st.DrawFn) -> v2_pb.ModelInferRequest:
    request = v2_pb.ModelInferRequest(model_name="m")
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(
            name=draw(names),
            datatype=draw(st.sampled_from(V2_DATATYPES) | names),
            shape=draw(st.lists(st.integers(-1, 5) | st.integers(0, 2**62), max_size=4)),
        )
        contents = tensor.contents
        contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=6)))
        contents.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6)))
        contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=80), max_size=3)))
        contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=3)))
    if draw(st.booleans()):
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=40), max_size=3)))
    return request


@FUZZ
@given(infer_requests())
def test_v2_grpc_request_decodes_or_refuses(request: v2_pb.ModelInferRequest) -> None:
    within(decodes_or_refuses(v2_grpc.decode_inputs, request, LIMITS), LIMITS)


# --- the text-format model config ----------------------------------------------------------------

config_words = st.sampled_from(
    [
        "model_config_list", "config", "name:", "base_path:", "model_platform:", "model_version_policy",
        "latest", "all", "specific", "versions:", "num_versions:", "version_labels", "key:", "value:",
        "custom_model_config", "{", "}", "<", ">", "[", "]", ":", ",", '"m"', '"/tmp/m"', '""', "1", "-1",
        "99999999999999999999", '"stable"', '"bad label!"', "# comment\n", "\n", '"\\x00"',
    ]
)  # fmt: skip
VALID = 'model_config_list { config { name: "m" base_path: "/tmp/m" } }'


@FUZZ
@given(st.lists(config_words, max_size=30).map(" ".join) | st.text(max_size=80) | st.just(VALID))
def test_model_config_text_parses_or_refuses(text: str) -> None:
    try:
        models = parse_model_config(text)
    except ConfigError:
        return
    assert all(model.name and str(model.base_path) for model in models)


@FUZZ
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "name": st.text(max_size=4),
                "base_path": st.text(max_size=4),
                "labels": st.dictionaries(st.text(max_size=4), st.integers(-(2**63), 2**63 - 1), max_size=2),
                "policy": st.sampled_from(["none", "latest", "all", "specific"]),
                "versions": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
                "custom": st.booleans(),
            }
        ),
        max_size=3,
    )
)
def test_model_server_config_message_converts_or_refuses(entries: list[dict[str, Any]]) -> None:
    message = config_pb.ModelServerConfig()
    for entry in entries:
        config = message.model_config_list.config.add(name=entry["name"], base_path=entry["base_path"])
        for label, version in entry["labels"].items():
            config.version_labels[label] = version
        policy = config.model_version_policy
        if entry["policy"] == "latest":
            policy.latest.num_versions = len(entry["versions"])
        elif entry["policy"] == "all":
            policy.all.SetInParent()
        elif entry["policy"] == "specific":
            policy.specific.versions.extend(entry["versions"])
    if entries and entries[0]["custom"]:
        message.custom_model_config.SetInParent()
    decodes_or_refuses(models_from_proto, message, "fuzz")


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=120))
def test_model_config_file_reads_or_refuses(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("config")) / "models.config"
    path.write_bytes(content)
    decodes_or_refuses(read_model_config_file, path)


def test_a_model_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """Found by test_model_config_file_reads_or_refuses: it raised UnicodeDecodeError."""
    path = tmp_path / "models.config"
    path.write_bytes(b"model_config_list { \x80 }")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_model_config_file(path)
