"""RequestLimits: built from the server config, checked at start, and each check names its flag."""

from __future__ import annotations

import numpy as np
import pytest

from inferd._proto import prediction_service_pb2 as ps
from inferd._proto.example_pb2 import BytesList, Example, Feature, FloatList
from inferd.config import ServerConfig
from inferd.errors import ConfigError, InvalidArgument, ResourceExhausted, Unavailable
from inferd.protocols.limits import HELD, STRING_OBJECT_BYTES, InflightBytes, RequestLimits, hold_strings
from inferd.protocols.tfserving_grpc import examples_to_inputs
from inferd.protocols.tfserving_rest import TensorDecoder
from inferd.types import Signature, TensorSpec


def test_limits_come_from_the_server_config() -> None:
    limits = RequestLimits.of(ServerConfig(max_tensor_elements=5, max_json_depth=2, max_instances=3))
    assert (limits.max_tensor_elements, limits.max_json_depth, limits.max_instances) == (5, 2, 3)
    assert limits.elements("x", [1, 5]) == 5
    with pytest.raises(ConfigError, match="--max_json_depth must be <= 512"):
        RequestLimits.of(ServerConfig(max_json_depth=10_000))
    with pytest.raises(ConfigError, match="--max_string_bytes must be >= 1"):
        RequestLimits.of(ServerConfig(max_string_bytes=0))


def test_each_check_names_its_flag() -> None:
    limits = RequestLimits(max_tensor_elements=10, max_json_depth=2, max_string_bytes=3, max_instances=4)
    with pytest.raises(ResourceExhausted, match="--max_tensor_elements"):
        limits.elements("x", [0, 11])
    with pytest.raises(InvalidArgument, match="negative dim"):
        limits.elements("x", [-1])
    with pytest.raises(ResourceExhausted, match="--max_string_bytes"):
        limits.string("x", 4)
    with pytest.raises(ResourceExhausted, match="--max_instances"):
        limits.instances("instances", 5)
    with pytest.raises(InvalidArgument, match="--max_json_depth"):
        limits.depth("x", 3)


def test_the_inflight_budget_refuses_past_its_limit_and_releases_what_a_request_held() -> None:
    budget = InflightBytes(100, max_request_bytes=60)
    first, second = budget.reservation(), budget.reservation()
    first.grow_to(60)
    first.grow_to(40)  # never shrinks while the request runs
    with pytest.raises(Unavailable, match="--max_inflight_bytes"):
        second.grow_to(41)
    assert (budget.held, second.held) == (60, 0)
    second.grow_to(40)
    first.release()
    first.release()  # idempotent
    assert budget.held == 40
    second.release()
    assert budget.held == 0


def test_decoded_strings_are_held_in_the_budget_of_the_running_request() -> None:
    """A string element takes a Python object and a copy of its characters (at most the
    request's bytes); numeric tensors take nothing more. Held once per call however often asked;
    refused for now (503) when others hold the budget, for good (413) when it never could."""
    budget = InflightBytes(10_000, max_request_bytes=1_000)
    other, request = budget.reservation(), budget.reservation()
    request.grow_to(1_000)
    strings = {"text": np.array([b"ab"] * 100, dtype=object), "x": np.zeros((100, 8), np.float32)}
    hold_strings(strings)  # no request running here: nothing to hold
    token = HELD.set(request)
    try:
        hold_strings({"x": np.zeros((100, 8), np.float32)})
        assert request.held == 1_000
        hold_strings(strings)
        want = 1_000 + 100 * STRING_OBJECT_BYTES + 1_000
        assert budget.held == request.held == want
        hold_strings(strings)  # the same inputs again (another call of the same request)
        assert budget.held == want
        request.release()
        request.grow_to(1_000)
        other.grow_to(budget.limit - want + 1)
        with pytest.raises(Unavailable, match="--max_inflight_bytes"):
            hold_strings(strings)
        assert request.held == 1_000  # what was held stays held
        other.release()
        with pytest.raises(ResourceExhausted, match=r"1000 string elements .* --max_inflight_bytes"):
            hold_strings({"text": np.array([b"ab"] * 1_000, dtype=object)})
    finally:
        HELD.reset(token)
    request.release()
    assert budget.held == 0
    whole = InflightBytes(1_000, max_request_bytes=1_000)  # the largest request stays servable
    largest = whole.reservation()
    largest.grow_to(1_000)
    token = HELD.set(largest)
    try:
        hold_strings({"text": np.array([b"x" * 990], dtype=object)})
    finally:
        HELD.reset(token)
    assert whole.held == 1_000


@pytest.mark.parametrize("limit", [-1, 59])
def test_the_inflight_budget_must_hold_the_largest_request(limit: int) -> None:
    with pytest.raises(ConfigError, match="--max_inflight_bytes"):
        InflightBytes(limit, max_request_bytes=60)


def test_a_zero_budget_holds_anything() -> None:
    budget = InflightBytes(0, max_request_bytes=60)
    budget.reservation().grow_to(10**12)
    assert budget.held == 10**12


def test_classify_examples_are_held_to_the_tensor_and_string_limits() -> None:
    """Features of tf.Example (Classify, Regress, MultiInference) count as the tensors they make:
    a float feature past ``max_tensor_elements`` over all examples, or a bytes value or a
    serialized example past ``max_string_bytes``, is refused before its values are copied."""
    limits = RequestLimits(max_tensor_elements=100, max_json_depth=2, max_string_bytes=10, max_instances=8)

    def examples(**features: Feature) -> ps.Input:
        request = ps.Input()
        for _ in range(2):
            example = request.example_list.examples.add()
            for name, feature in features.items():
                example.features.feature[name].CopyFrom(feature)
        return request

    wide = Signature("s", (TensorSpec("x", np.dtype(np.float32), (-1, -1)),), ())
    floats = Feature(float_list=FloatList(value=[1.0] * 50))
    inputs, count = examples_to_inputs(wide, examples(x=floats), limits)  # 2 x 50: at the limit
    assert (inputs["x"].shape, count) == ((2, 50), 2)
    with pytest.raises(ResourceExhausted, match=r"'x'.*--max_tensor_elements"):
        examples_to_inputs(wide, examples(x=Feature(float_list=FloatList(value=[1.0] * 51))), limits)
    text = Signature("s", (TensorSpec("s", np.dtype(object), (-1, 1)),), ())
    assert examples_to_inputs(text, examples(s=Feature(bytes_list=BytesList(value=[b"a" * 10]))), limits)
    with pytest.raises(ResourceExhausted, match=r"'s'.*--max_string_bytes"):
        examples_to_inputs(text, examples(s=Feature(bytes_list=BytesList(value=[b"a" * 11]))), limits)
    parser = Signature("s", (TensorSpec("serialized", np.dtype(object), (-1,)),), ())
    with pytest.raises(ResourceExhausted, match=r"'serialized'.*--max_string_bytes"):
        examples_to_inputs(parser, examples(s=Feature(bytes_list=BytesList(value=[b"a" * 20]))), limits)


def test_a_context_repeated_in_every_serialized_example_is_held_to_the_request_limit() -> None:
    """A parser is fed each example serialized after the context, as TF Serving feeds it: a 270 KB
    REST body (a 200 KB context, 2,000 examples) made 400 MB of them, and one of 1.3 MB would
    have made 80 GB. The context's bytes times the examples are held to --max_request_bytes."""
    limits = RequestLimits(
        max_tensor_elements=100,
        max_json_depth=2,
        max_string_bytes=1000,
        max_instances=100,
        max_request_bytes=700,
    )
    assert RequestLimits.of(ServerConfig(max_request_bytes=7)).max_request_bytes == 7
    parser = Signature("s", (TensorSpec("serialized", np.dtype(object), (-1,)),), ())
    request = ps.Input()
    request.example_list_with_context.context.features.feature["pad"].float_list.value.extend([1.0] * 23)
    for count, fits in ((6, True), (7, False)):  # the context takes 107 bytes serialized
        del request.example_list_with_context.examples[:]
        request.example_list_with_context.examples.extend([Example()] * count)
        json_context = {"pad": [1.5] * 23}
        if fits:
            assert len(examples_to_inputs(parser, request, limits)[0]["serialized"]) == count
            assert (
                len(TensorDecoder(limits).examples(parser, [{}] * count, json_context)["serialized"]) == count
            )
            continue
        with pytest.raises(ResourceExhausted, match=r"'serialized'.* 749 bytes.*--max_request_bytes"):
            examples_to_inputs(parser, request, limits)
        with pytest.raises(ResourceExhausted, match=r"'serialized'.* 749 bytes.*--max_request_bytes"):
            TensorDecoder(limits).examples(parser, [{}] * count, json_context)


def test_a_context_repeated_in_every_row_is_counted_before_numpy_copies_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A REST context feeding an input by name is one JSON list that every row shares: numpy
    copied it once per example before the element count was checked (a 285 KB body of a
    1,000-value context and 70,000 examples took 535 MB and 12 s to be refused)."""
    limits = RequestLimits(max_tensor_elements=100, max_json_depth=2, max_string_bytes=10, max_instances=20)
    wide = Signature("s", (TensorSpec("x", np.dtype(np.float32), (-1, -1)),), ())
    assert TensorDecoder(limits).examples(wide, [{}] * 10, {"x": [1.0] * 10})["x"].shape == (10, 10)
    monkeypatch.setattr(TensorDecoder, "array", lambda *_: pytest.fail("copied before the check"))
    with pytest.raises(ResourceExhausted, match=r"'x': shape \[11, 10\].*--max_tensor_elements"):
        TensorDecoder(limits).examples(wide, [{}] * 11, {"x": [1.0] * 10})
