"""VersionStatistics' arithmetic, and the parameters of a V2 load (Triton's config override)."""

from __future__ import annotations

import pytest

from inferd.control import SettingsOverride
from inferd.errors import InvalidArgument
from inferd.protocols.v2_triton import load_parameters, statistics_document
from inferd.statistics import VersionStatistics
from inferd.types import ModelId


def test_requests_and_executions_add_up() -> None:
    stats = VersionStatistics(ModelId("m", 3))
    stats.executed(2, 0.004)
    stats.executed(2, 0.002)
    stats.executed(5, 0.010)
    stats.succeeded(0.010, 0.001, 0.004)
    stats.failed(0.0005)
    assert (stats.inference_count, stats.execution_count) == (9, 3)
    assert (stats.success.count, stats.success.ns) == (1, 10_000_000)
    assert (stats.compute_input.count, stats.compute_input.ns) == (1, 5_000_000)
    assert (stats.fail.count, stats.fail.ns) == (1, 500_000)
    assert stats.last_inference_ms > 0
    (stat,) = statistics_document([stats])["model_stats"]
    assert (stat["name"], stat["version"]) == ("m", "3")
    assert [(b["batch_size"], b["compute_infer"]) for b in stat["batch_stats"]] == [
        (2, {"count": 2, "ns": 6_000_000}),
        (5, {"count": 1, "ns": 10_000_000}),
    ]
    assert stat["inference_stats"]["queue"] == {"count": 1, "ns": 1_000_000}


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({}, None),
        ({"config": "{}"}, None),
        ({"config": '{"max_batch_size": "16"}'}, SettingsOverride(max_batch_size=16)),
        ({"config": b'{"max_batch_size": 4, "name": "m"}'}, SettingsOverride(max_batch_size=4)),
        (
            {"config": '{"dynamic_batching": {"max_queue_delay_microseconds": "250"}}'},
            SettingsOverride(batch_timeout_micros=250),
        ),
    ],
)
def test_config_overrides_inferd_honours(
    parameters: dict[str, object], expected: SettingsOverride | None
) -> None:
    assert load_parameters("m", parameters) == expected


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"config": "max_batch_size: 4"}, "not valid JSON"),
        ({"config": "[1]"}, "must be a JSON object"),
        ({"config": 4}, "JSON text of a model configuration"),
        ({"config": '{"max_batch_size": true}'}, "'max_batch_size' must be an integer >= 1, got True"),
        ({"config": '{"max_batch_size": "-1"}'}, "'max_batch_size' must be an integer >= 1"),
        ({"config": '{"backend": "onnxruntime"}'}, "config keys ['backend'] are not supported"),
        ({"config": '{"dynamic_batching": []}'}, "'dynamic_batching' must be an object"),
        ({"config": '{"name": "n"}'}, "config 'name' 'n' is not the model's name 'm'"),
        ({"file:1/model.onnx": b"x"}, "['file:1/model.onnx'] are not supported"),
        ({"file:" + "A" * 300: b"x"}, "failed to poll from model repository"),
    ],
)
def test_config_overrides_inferd_refuses(parameters: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        load_parameters("m", parameters)
    assert fragment in error.value.message
    assert len(error.value.message) < 400
