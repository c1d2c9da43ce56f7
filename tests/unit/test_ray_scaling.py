"""``inferd ray serve``'s scaling flags, or an ``inferd.toml``'s ``[ray]`` table under them, become
Serve's deployment options, reacting in seconds."""

from __future__ import annotations

import math
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from inferd.cli import main
from inferd.config import ServerConfig, read_model_settings
from inferd.errors import ConfigError
from inferd.ray import deployment
from inferd.ray.deployment import ANSWERED, IN_FLIGHT, LOOP_UTILIZATION, Scaling, code_version, scaling_file
from tests.models import write_onnx_affine
from tests.pki import Authority
from tests.s3_server import S3Server, s3_server

__all__ = ["s3_server"]


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


def test_the_code_version_changes_with_every_serve_setting_tokens_included() -> None:
    base = ServerConfig(model_base_path="/models")
    assert code_version(base) == code_version(ServerConfig(model_base_path="/models"))
    others = [
        ServerConfig(model_base_path="/other"),
        ServerConfig(model_base_path="/models", admin_token="t"),
        ServerConfig(model_base_path="/models", api_token="t"),
        ServerConfig(model_base_path="/models", memory_budget="1GiB"),
    ]
    assert len({code_version(c) for c in [base, *others]}) == 1 + len(others)


def _no_cluster(*_: object) -> None:
    raise AssertionError("deployed: the values were not refused")


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("--max_replicas=0", "--max_replicas must be"),
        ("--min_replicas=-1", "--min_replicas must be"),
        ("--target_ongoing_requests=0", "--target_ongoing_requests must be"),
        ("--target_loop_utilization=0", "--target_loop_utilization must be > 0 and <= 1"),
        ("--target_loop_utilization=1.5", "--target_loop_utilization must be > 0 and <= 1"),
        ("--upscale_delay_s=-2", "--upscale_delay_s must be"),
    ],
)
def test_a_bad_scaling_flag_exits_2_naming_it(
    flag: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ray", "serve", "/models", flag]) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("bound", ["--min_replicas=5", "--max_replicas=4"])
def test_a_fixed_replica_count_with_autoscaling_bounds_exits_2_saying_so(
    bound: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # --num_replicas=2 --min_replicas=5 said "--max_replicas must be ... got 1", a flag not given;
    # with --max_replicas=4 the bound was silently ignored.
    monkeypatch.setattr(deployment, "deploy", _no_cluster)
    assert main(["ray", "serve", "/models", "--num_replicas=2", bound]) == 2
    assert "--num_replicas fixes the number of replicas" in capsys.readouterr().err


def test_the_autoscaling_policy_scales_on_requests_in_flight_and_on_loop_utilization() -> None:
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    options = Scaling(min_replicas=1, max_replicas=8, target_ongoing_requests=4).options()
    config = AutoscalingConfig(**options["autoscaling_config"])
    config.policy.serialize_policy()  # as Serve does: the import path must resolve
    policy = _resolve_policy_callable(config.policy)  # Serve's own: a class is built with policy_kwargs

    def decide(
        replicas: int,
        inferd: list[float],
        serve: float,
        loop: list[float] | None = None,
        answered: float = 1.0,
    ) -> float:
        context = AutoscalingContext(
            deployment_id=DeploymentID(name="inferd", app_name="inferd"),
            deployment_name="inferd",
            app_name="inferd",
            current_num_replicas=replicas,
            target_num_replicas=replicas,
            running_replicas=[],
            total_num_requests=serve,
            total_queued_requests=0,
            aggregated_metrics={
                IN_FLIGHT: dict(enumerate(inferd)),
                LOOP_UTILIZATION: dict(enumerate(loop or [0.0] * replicas)),
                ANSWERED: dict(enumerate([answered] * replicas)),
            },
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
    # A fast model saturates the event loop while inferd's count stays near 0 (default target 0.7).
    assert math.ceil(decide(1, [0.2], 0.0, [0.95])) == 2
    assert math.ceil(decide(2, [0.1, 0.1], 0.0, [0.45, 0.45])) == 2  # one replica would be at 0.9
    assert math.ceil(decide(2, [0.1, 0.1], 0.0, [0.3, 0.3])) == 1
    assert math.ceil(decide(3, [0.0] * 3, 0.0, [0.09] * 3)) == 1  # light, but not nothing
    assert math.ceil(decide(1, [0.0], 0.0, [0.01], answered=0.5)) == 1  # answering: never to zero
    assert decide(2, [0.0, 0.0], 0.0, [0.02, 0.03], answered=0.0) == 0  # housekeeping: down to zero


def test_loop_utilization_is_the_measured_threads_cpu_share() -> None:
    from inferd.ray.replica import LoopUtilization

    utilization = LoopUtilization()
    time.sleep(0.2)
    assert utilization.read() < 0.2  # asleep: next to no CPU
    cpu_s, wall_s = time.thread_time(), time.monotonic()
    while time.thread_time() < cpu_s + 0.05:
        pass
    share = (time.thread_time() - cpu_s) / (time.monotonic() - wall_s)  # below 1 on a busy machine
    assert abs(utilization.read() - share) < 0.1
    answers: list[float] = []
    other = threading.Thread(target=lambda: answers.append(utilization.read()))
    other.start()
    other.join()
    assert answers == [0.0]  # another thread's clock cannot be compared; it is measured from now


def _settings(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inferd.toml").write_text(text)
    return folder


def test_a_repositorys_inferd_toml_sets_the_scaling_and_flags_override_it(tmp_path: Path) -> None:
    repository = _settings(
        tmp_path / "repo", "[ray]\nmin_replicas = 0\nmax_replicas = 4\nupscale_delay_s = 1\n"
    )
    where, values = scaling_file(str(repository), "")
    assert where.endswith("inferd.toml [ray]")
    assert values == {"min_replicas": 0, "max_replicas": 4, "upscale_delay_s": 1.0}
    assert isinstance(values["upscale_delay_s"], float)
    assert scaling_file(str(tmp_path / "absent"), "") == ("", {})
    # A single model's own inferd.toml may hold the table beside the model's settings.
    model = _settings(tmp_path / "m", 'runtime = "onnx"\n[ray]\nnum_replicas = 2\n')
    assert scaling_file("", str(model))[1] == {"num_replicas": 2}
    assert read_model_settings(model).runtime == "onnx"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[ray]\nmax_replica = 2\n", "unknown key 'max_replica'"),
        ("[ray]\nmax_replicas = 2.5\n", "'max_replicas' must be an integer"),
        ("[ray]\nmin_replicas = true\n", "'min_replicas' must be an integer"),
        ('[ray]\nupscale_delay_s = "2"\n', "'upscale_delay_s' must be a number"),
        ("ray = 3\n", "expected a table"),
        ('runtime = "onnx"\n', "a repository's inferd.toml holds [ray]"),
        ("[ray\n", "inferd.toml"),
    ],
)
def test_a_bad_repository_inferd_toml_exits_2_naming_the_key(
    text: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = _settings(tmp_path / "repo", text)
    assert main(["ray", "serve", str(repository)]) == 2
    assert said in capsys.readouterr().err


def test_ranges_are_checked_once_flags_are_merged_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = _settings(tmp_path / "repo", "[ray]\nmin_replicas = 3\n")
    assert main(["ray", "serve", str(repository), "--max_replicas=2"]) == 2
    err = capsys.readouterr().err
    assert "max_replicas must be >= 1 and >= min_replicas (3), got 2 (flags over " in err
    assert "inferd.toml [ray]" in err


def _no_cluster(*_: object) -> None:
    raise AssertionError("deployed: the values were not refused")


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("--target_ongoing_requests=nan", "--target_ongoing_requests must be > 0, got nan"),
        ("--upscale_delay_s=nan", "--upscale_delay_s must be >= 0 seconds, got nan"),
        ("--graceful_shutdown_timeout_s=nan", "--graceful_shutdown_timeout_s must be >= 0 seconds"),
        ("--num_cpus=inf", "--num_cpus must be a number of CPUs >= 0, got inf"),
        ("--num_cpus=-1", "--num_cpus must be a number of CPUs >= 0, got -1.0"),
    ],
)
def test_nan_and_infinite_cpus_exit_2_before_any_cluster_is_joined(
    flag: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serve refuses them with a traceback once connected; the range checks see them first."""
    monkeypatch.setattr(deployment, "deploy", _no_cluster)
    assert main(["ray", "serve", str(tmp_path), flag]) == 2
    assert said in capsys.readouterr().err


def test_nan_in_the_scaling_table_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deployment, "deploy", _no_cluster)
    repository = _settings(tmp_path / "repo", "[ray]\ndownscale_delay_s = nan\n")
    assert main(["ray", "serve", str(repository)]) == 2
    assert "downscale_delay_s must be >= 0 seconds, got nan (flags over " in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--tls_cert", "--ssl_config_file"])
def test_tls_exits_2_rather_than_serving_plain_text(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serve's ingress accepts the connections: a replica's TLS settings would never be used."""
    monkeypatch.setattr(deployment, "deploy", _no_cluster)
    issued = Authority(tmp_path / "pki", "ca").issue("localhost", server=True)
    files = {"--tls_cert": [f"--tls_cert={issued.cert}", f"--tls_key={issued.key}"]}
    ssl_config = tmp_path / "ssl.txt"
    ssl_config.write_text(
        f'server_key: "{issued.key.read_text()}"\nserver_cert: "{issued.cert.read_text()}"\n'
    )
    files["--ssl_config_file"] = [f"--ssl_config_file={ssl_config}"]
    assert main(["ray", "serve", str(tmp_path), *files[flag]]) == 2
    assert f"{flag} does not apply on Ray" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--tls_cert does not apply on Ray"):
        deployment.app_builder(
            {"repository": str(tmp_path), "tls_cert": str(issued.cert), "tls_key": str(issued.key)}
        )


def test_relative_paths_reach_the_replicas_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replicas run in Ray's working directories, not this command's."""
    deployed: list[ServerConfig] = []

    def deploy(config: ServerConfig, *_: object) -> tuple[str, int]:
        deployed.append(config)
        return config.host, config.rest_api_port

    monkeypatch.setattr(deployment, "deploy", deploy)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    argv = ["ray", "serve", "models", "--model_cache_dir=cache", "--rollout_state_dir=s3://b/r", "--detach"]
    assert main(argv) == 0
    (config,) = deployed
    assert config.repository == str(tmp_path / "models")
    assert config.model_cache_dir == str(tmp_path / "cache")
    assert config.rollout_state_dir == "s3://b/r"  # not a local path


def test_the_address_printed_is_the_one_serve_listens_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Serve keeps the ports it started with on a cluster: a deploy naming others is told so."""
    monkeypatch.setattr(deployment, "deploy", lambda *_: ("127.0.0.1", 18501))
    assert main(["ray", "serve", str(tmp_path), "--host=127.0.0.1", "--rest_api_port=9000", "--detach"]) == 0
    err = capsys.readouterr().err
    assert "Serve already listens on 127.0.0.1:18501" in err
    assert err.endswith("inferd ray: serving on http://127.0.0.1:18501\n")


def test_the_scaling_table_is_read_from_an_object_store(s3_server: S3Server) -> None:
    s3_server.client().create_bucket(Bucket="bucket")
    s3_server.client().put_object(Bucket="bucket", Key="repo/inferd.toml", Body=b"[ray]\nmax_replicas = 3\n")
    assert scaling_file("s3://bucket/repo", "") == ("s3://bucket/repo/inferd.toml [ray]", {"max_replicas": 3})
    assert scaling_file("s3://bucket/elsewhere", "") == ("", {})


def test_a_negative_scale_from_zero_wait_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ray", "serve", "/models", "--scale_from_zero_wait_s=-1"]) == 2
    assert "--scale_from_zero_wait_s must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["ray", "status"], ["ray", "serve", "REPO"], ["batch", "REPO"]])
def test_an_address_where_no_cluster_answers_exits_2_at_once(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ray's own connect retried for minutes: inferd ray status --address=127.0.0.1:1 hung.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, never listening: refused
        argv = [str(tmp_path) if part == "REPO" else part for part in command]
        if command[0] == "batch":
            write_onnx_affine(tmp_path / "1", scale=1.0)
            np.save(tmp_path / "in.npy", np.ones((2, 4), np.float32))
            argv += [str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "--engine=ray"]
        started = time.monotonic()
        assert main([*argv, f"--address={address}"]) == 2
    assert time.monotonic() - started < deployment.CONNECT_TIMEOUT_S + 5
    assert f"no Ray cluster answers at {address}" in capsys.readouterr().err
