"""``inferd ray serve``'s scaling flags become Serve's deployment options, reacting in seconds."""

from __future__ import annotations

import pytest

from inferd.cli import main
from inferd.ray.deployment import Scaling


def test_autoscaling_reacts_in_seconds_on_requests_in_flight() -> None:
    options = Scaling(min_replicas=0, max_replicas=4, target_ongoing_requests=5).options()
    autoscaling = options["autoscaling_config"]
    assert autoscaling["min_replicas"] == 0
    assert autoscaling["initial_replicas"] == 1  # scaling from zero starts with one replica up
    assert autoscaling["max_replicas"] == 4
    assert autoscaling["target_ongoing_requests"] == 5
    assert autoscaling["upscale_delay_s"] <= 5
    assert autoscaling["downscale_delay_s"] <= 60
    assert "num_replicas" not in options


def test_a_fixed_count_turns_autoscaling_off() -> None:
    options = Scaling(num_replicas=3).options()
    assert options["num_replicas"] == 3
    assert "autoscaling_config" not in options


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("--max_replicas=0", "--max_replicas must be"),
        ("--min_replicas=-1", "--min_replicas must be"),
        ("--target_ongoing_requests=0", "--target_ongoing_requests must be"),
        ("--upscale_delay_s=-2", "--upscale_delay_s must be"),
    ],
)
def test_a_bad_scaling_flag_exits_2_naming_it(
    flag: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ray", "serve", "/models", flag]) == 2
    assert said in capsys.readouterr().err
