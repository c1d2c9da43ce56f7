"""``inferd ray serve``'s scaling flags become Serve's deployment options, reacting in seconds."""

from __future__ import annotations

import pytest

from inferd.cli import main
from inferd.ray.deployment import IN_FLIGHT, Scaling


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


def test_the_autoscaling_policy_scales_on_the_requests_inferd_has_in_flight() -> None:
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    options = Scaling(min_replicas=1, max_replicas=8, target_ongoing_requests=4).options()
    config = AutoscalingConfig(**options["autoscaling_config"])
    config.policy.serialize_policy()  # as Serve does: the import path must resolve
    policy = config.policy.get_policy()

    def decide(replicas: int, inferd: list[float], serve: float) -> float:
        context = AutoscalingContext(
            deployment_id=DeploymentID(name="inferd", app_name="inferd"),
            deployment_name="inferd",
            app_name="inferd",
            current_num_replicas=replicas,
            target_num_replicas=replicas,
            running_replicas=[],
            total_num_requests=serve,
            total_queued_requests=0,
            aggregated_metrics={IN_FLIGHT: dict(enumerate(inferd))},
            raw_metrics={},
            capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=8,
            policy_state={},
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=None,
            config=config,
        )
        desired, _ = policy(context)
        return float(desired)

    assert decide(2, [6.0, 10.0], 0.0) == 4  # behind HAProxy only inferd counts its requests
    assert decide(2, [1.0, 1.0], 12.0) == 3  # requests queued in front of the replicas count too
    assert decide(3, [0.0, 0.0, 0.0], 0.0) == 0  # idle: Serve's bounds keep min_replicas
