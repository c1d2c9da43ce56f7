"""The model config file (TF Serving text format), inferd.toml and version policies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inferd.config import (
    BatchingParameters,
    FeatureSettings,
    ModelSettings,
    ServerConfig,
    VersionPolicy,
    channel_arguments,
    parse_model_config,
    read_model_config_file,
    read_model_settings,
    with_server_flags,
    worker_count,
)
from inferd.errors import ConfigError

FULL = """
model_config_list {
  config {
    name: "mnist"
    base_path: "/models/mnist"
    model_platform: "onnx"
    model_version_policy { specific { versions: 43 versions: 42 } }
    version_labels { key: "stable" value: 42 }
    version_labels { key: "canary" value: 43 }
  }
  config { name: "latest2" base_path: "rel/path" model_version_policy { latest { num_versions: 2 } } }
  config { name: "every" base_path: "/models/every" model_version_policy { all {} } }
  config { name: "plain" base_path: "/models/plain" }
}
"""


def test_parse_model_config_reads_every_field() -> None:
    mnist, latest2, every, plain = parse_model_config(FULL)

    assert mnist.name == "mnist"
    assert mnist.base_path == Path("/models/mnist")
    assert mnist.platform == "onnx"
    assert mnist.version_policy == VersionPolicy("specific", versions=(42, 43))
    assert dict(mnist.labels) == {"stable": 42, "canary": 43}

    assert latest2.base_path == Path("rel/path")  # kept as written; the caller resolves it
    assert latest2.version_policy == VersionPolicy("latest", num_versions=2)
    assert latest2.platform is None
    assert dict(latest2.labels) == {}

    assert every.version_policy == VersionPolicy("all")

    # No policy: None, so that inferd.toml and then the default (latest 1) decide.
    assert plain.version_policy is None


def test_latest_below_one_is_treated_as_one() -> None:
    (model,) = parse_model_config(
        'model_config_list { config { name: "m" base_path: "/m" '
        "model_version_policy { latest { num_versions: 0 } } } }"
    )
    assert model.version_policy == VersionPolicy("latest", num_versions=1)
    assert model.version_policy.select([1, 2, 3]) == {3}


def test_an_empty_config_has_no_models() -> None:
    assert parse_model_config("") == []
    assert parse_model_config("model_config_list {}") == []


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ('model_config_list { config { name: "m" base_path: "/m" }', ["models.config", "1:"]),
        ('model_config_list { config { name: "m" base_path: "/m" colour: "red" } }', ["colour"]),
        ('model_config_list { config { name: "m" base_path: 7 } }', ["base_path"]),
        ('model_config_list { config { name: "m" base_path: "/m" } } garbage', ["garbage"]),
        ('model_config_list { config { base_path: "/m" } }', ["has no name"]),
        ('model_config_list { config { name: "m" } }', ["'m'", "has no base_path"]),
        (
            'model_config_list { config { name: "m" base_path: "/a" } config { name: "m" base_path: "/b" } }',
            ["'m'", "configured twice"],
        ),
        (
            'model_config_list { config { name: "m" base_path: "/m" '
            'version_labels { key: "not-ok" value: 1 } } }',
            ["'not-ok'", "[a-zA-Z0-9_]+"],
        ),
    ],
)
def test_parse_model_config_errors_name_the_problem(text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_model_config(text, "models.config")
    message = caught.value.message
    assert message.startswith("models.config")
    for fragment in fragments:
        assert fragment in message


def test_labels_may_use_every_character_of_the_documented_alphabet() -> None:
    (model,) = parse_model_config(
        'model_config_list { config { name: "m" base_path: "/m" '
        'version_labels { key: "_" value: 1 } version_labels { key: "Stable_2" value: 2 } } }'
    )
    assert dict(model.labels) == {"_": 1, "Stable_2": 2}


def test_read_model_config_file(tmp_path: Path) -> None:
    path = tmp_path / "models.config"
    path.write_text(FULL)
    assert [m.name for m in read_model_config_file(path)] == ["mnist", "latest2", "every", "plain"]
    with pytest.raises(ConfigError, match=r"cannot read model config file .*missing\.config"):
        read_model_config_file(tmp_path / "missing.config")


# inferd.toml


def settings(tmp_path: Path, text: str) -> ModelSettings:
    (tmp_path / "inferd.toml").write_text(text)
    return read_model_settings(tmp_path)


def test_no_inferd_toml_gives_the_defaults(tmp_path: Path) -> None:
    assert read_model_settings(tmp_path) == ModelSettings()
    assert read_model_settings(tmp_path / "absent") == ModelSettings()


def test_a_full_inferd_toml(tmp_path: Path) -> None:
    got = settings(
        tmp_path,
        """
        runtime = "onnx"
        version_policy = { latest = 2 }
        warmup = false

        [onnx]
        intra_op_num_threads = 1

        [labels]
        stable = 1
        canary = 2

        [batching]
        max_batch_size = 8
        allowed_batch_sizes = [4, 8]
        """,
    )
    assert got.runtime == "onnx"
    assert dict(got.options("onnx")) == {"intra_op_num_threads": 1}
    assert got.version_policy == VersionPolicy("latest", num_versions=2)
    assert dict(got.labels) == {"stable": 1, "canary": 2}
    assert got.warmup is False
    assert got.batching is not None
    assert (got.batching.max_batch_size, got.batching.allowed_batch_sizes) == (8, (4, 8))
    assert got.batching.batch_timeout_micros == BatchingParameters().batch_timeout_micros


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("{ latest = 3 }", VersionPolicy("latest", num_versions=3)),
        ("{ all = true }", VersionPolicy("all")),
        ("{ specific = [3, 1] }", VersionPolicy("specific", versions=(1, 3))),
    ],
)
def test_inferd_toml_version_policies(tmp_path: Path, policy: str, expected: VersionPolicy) -> None:
    assert settings(tmp_path, f"version_policy = {policy}\n").version_policy == expected


def test_each_runtime_reads_its_own_table_without_a_runtime_key(tmp_path: Path) -> None:
    got = settings(tmp_path, "[sklearn]\nmethod = 'predict_proba'\n[onnx]\nintra_op_num_threads = 1\n")
    assert got.runtime is None
    assert dict(got.options("sklearn")) == {"method": "predict_proba"}
    assert dict(got.options("onnx")) == {"intra_op_num_threads": 1}
    assert dict(got.options("torch")) == {}


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("runtime = 'onnx'\ncolour = 'red'\n", ["unknown key(s) ['colour']", "version_policy"]),
        ("runtime = \n", ["inferd.toml"]),
        ("runtime = 3\n", ["'runtime' must be a string"]),
        ("warmup = 'yes'\n", ["'warmup' must be true or false"]),
        ("version_policy = { latest = 0 }\n", ["version_policy", "latest = 0"]),
        ("version_policy = { latest = true }\n", ["version_policy"]),
        ("version_policy = { all = false }\n", ["version_policy", "all = False"]),
        ("version_policy = { specific = [] }\n", ["version_policy", "specific"]),
        ("version_policy = { specific = ['1'] }\n", ["version_policy", "specific"]),
        ("version_policy = { latest = 1, all = true }\n", ["takes one of"]),
        ("version_policy = 'latest'\n", ["version_policy must be a table"]),
        ("[labels]\n'bad label' = 1\n", ["[labels]", "'bad label'", "[a-zA-Z0-9_]+"]),
        ("[labels]\n'é' = 1\n", ["[labels]", "[a-zA-Z0-9_]+"]),
        ("[labels]\nstable = 'one'\n", ["[labels]", "'stable' must name an integer version"]),
        ("[labels]\nstable = true\n", ["'stable' must name an integer version"]),
        ("labels = 3\n", ["[labels] must be a table"]),
        ("onnx = 3\n", ["[onnx] must be a table"]),
        ("[batching]\nmax_batch_size = 0\n", ["max_batch_size must be >= 1"]),
        ("[batching]\nmax_batch = 4\n", ["[batching]", "unknown key(s) ['max_batch']"]),
        ("device = 'gpu'\n", ['\'device\' must be "cpu" or "cuda:N"', "'gpu'"]),
        ("device = 0\n", ["'device' must be"]),
        ("isolation = 'thread'\n", ["'isolation' must be one of ['none', 'process']", "'thread'"]),
        ("safe = false\n", ["unknown key(s) ['safe']"]),
    ],
)
def test_invalid_inferd_toml_errors_name_the_file_and_the_problem(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(tmp_path, text)
    message = caught.value.message
    assert "inferd.toml" in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("text", "device"),
    [
        ("", "cpu"),
        ("device = 'cpu'\n", "cpu"),
        ("device = 'cuda'\n", "cuda:0"),
        ("device = 'cuda:1'\n", "cuda:1"),
    ],
)
def test_device_defaults_to_the_cpu_and_cuda_means_the_first_gpu(
    tmp_path: Path, text: str, device: str
) -> None:
    assert settings(tmp_path, text).device == device


@pytest.mark.parametrize(("text", "isolation"), [("", "none"), ("isolation = 'process'\n", "process")])
def test_isolation_defaults_to_the_server_process(tmp_path: Path, text: str, isolation: str) -> None:
    assert settings(tmp_path, text).isolation == isolation


def test_an_inferd_toml_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "inferd.toml")  # reading a FIFO would block until a writer came
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_model_settings(tmp_path)
    (tmp_path / "inferd.toml").unlink()
    os.symlink(tmp_path / "absent.toml", tmp_path / "inferd.toml")
    with pytest.raises(ConfigError, match="is a broken symbolic link"):
        read_model_settings(tmp_path)


@pytest.mark.parametrize("runtime", ["tensorflow", "tflite", "torch", "xgboost", "lightgbm"])
def test_each_framework_has_its_options_table(tmp_path: Path, runtime: str) -> None:
    assert dict(settings(tmp_path, f"[{runtime}]\nnum_threads = 2\n").options(runtime)) == {"num_threads": 2}


# VersionPolicy.select


@pytest.mark.parametrize(
    ("policy", "on_disk", "expected"),
    [
        (VersionPolicy(), [1, 2, 3], {3}),
        (VersionPolicy(), [], set()),
        (VersionPolicy("latest", num_versions=2), [5, 1, 3], {5, 3}),
        (VersionPolicy("latest", num_versions=5), [1, 2], {1, 2}),
        (VersionPolicy("latest", num_versions=0), [1, 2], {2}),
        (VersionPolicy("latest", num_versions=2), [2, 2, 1], {2, 1}),
        (VersionPolicy("all"), [3, 1, 2], {1, 2, 3}),
        (VersionPolicy("all"), [], set()),
        (VersionPolicy("specific", versions=(1, 3)), [1, 2, 3, 4], {1, 3}),
        (VersionPolicy("specific", versions=(1, 9)), [1, 2], {1}),  # missing ones are skipped
        (VersionPolicy("specific", versions=(9,)), [1, 2], set()),
    ],
)
def test_version_policy_select(policy: VersionPolicy, on_disk: list[int], expected: set[int]) -> None:
    assert policy.select(on_disk) == expected
    assert policy.select(iter(on_disk)) == expected  # any iterable, read once


def test_version_policy_str() -> None:
    assert str(VersionPolicy()) == "latest 1"
    assert str(VersionPolicy("all")) == "all"
    assert str(VersionPolicy("specific", versions=(1, 3))) == "specific [1, 3]"


def test_an_empty_config_file_is_refused_so_a_half_written_file_never_unloads_everything(
    tmp_path: Path,
) -> None:
    path = tmp_path / "models.config"
    path.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_model_config_file(path)
    path.write_text("model_config_list {}\n")
    assert read_model_config_file(path) == []


# [features] and prediction_cache_size

FEATURES = """
[features]
store = "features.parquet"
entity = "restaurant_id"
fetch = ["orders", "outstanding"]
[features.inputs]
x = ["distance", "orders", "outstanding"]
"""


def test_features_defaults_and_a_relative_store_resolved_against_the_model_folder(tmp_path: Path) -> None:
    got = settings(tmp_path, FEATURES).features
    assert got == FeatureSettings(
        store=str(tmp_path / "features.parquet"),
        entity=("restaurant_id",),
        fetch=("orders", "outstanding"),
        inputs={"x": ("distance", "orders", "outstanding")},
    )
    assert (got.prefix, got.key_prefix, got.lookup_timeout_ms, got.on_store_error) == (
        "",
        "restaurant_id",
        50.0,
        "fail",
    )
    assert (got.cache_ttl_s, got.cache_size, got.dtypes, got.defaults) == (5.0, 100_000, {}, {})
    assert settings(tmp_path, "").prediction_cache_size == 0


def test_every_features_option(tmp_path: Path) -> None:
    got = settings(
        tmp_path,
        """
        prediction_cache_size = 500
        [features]
        store = "redis://:secret@cache:6380/2"
        entity = ["city", "restaurant_id"]
        prefix = "r"
        fetch = ["orders", "outstanding"]
        dtypes = { orders = "int64" }
        defaults = { orders = 0, outstanding = 0.5 }
        lookup_timeout_ms = 20
        on_store_error = "defaults"
        cache_ttl_s = 1.5
        cache_size = 10
        [features.inputs]
        x = ["distance", "outstanding"]
        n = ["orders"]
        """,
    )
    assert got.prediction_cache_size == 500
    assert got.features == FeatureSettings(
        store="redis://:secret@cache:6380/2",
        entity=("city", "restaurant_id"),
        fetch=("orders", "outstanding"),
        inputs={"x": ("distance", "outstanding"), "n": ("orders",)},
        prefix="r",
        dtypes={"orders": "int64"},
        defaults={"orders": 0, "outstanding": 0.5},
        lookup_timeout_ms=20.0,
        on_store_error="defaults",
        cache_ttl_s=1.5,
        cache_size=10,
    )
    assert got.features.key_prefix == "r"


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (("fetch = [", "colour = 1\nfetch = ["), "unknown key(s) ['colour']"),
        (('entity = "restaurant_id"\n', ""), "missing key(s) ['entity']"),
        (('store = "features.parquet"', 'store = "http://x"'), "must be redis://"),
        (('store = "features.parquet"', 'store = "redis://h:abc/0"'), "the port must be a number"),
        (('store = "features.parquet"', 'store = "redis://h:6379/x"'), "the database must be a number"),
        (('store = "features.parquet"', 'store = "features.json"'), "must be a .parquet or .csv"),
        (('store = "features.parquet"', "store = 3"), "'store' must be a str"),
        (('entity = "restaurant_id"', "entity = []"), "non-empty lists of names"),
        (('x = ["distance", "orders", "outstanding"]', "x = []"), "non-empty list of columns"),
        (
            ('x = ["distance", "orders", "outstanding"]', 'x = ["orders"]'),
            "['outstanding'] are in no model input",
        ),
        (
            ("[features.inputs]", "dtypes = { other = 'int64' }\n[features.inputs]"),
            "['other'] are not in 'fetch'",
        ),
        (("[features.inputs]", "defaults = { orders = 'x' }\n[features.inputs]"), "values must be numbers"),
        (
            ("[features.inputs]", "on_store_error = 'ignore'\n[features.inputs]"),
            "must be 'fail' or 'defaults'",
        ),
        (("[features.inputs]", "on_store_error = 'defaults'\n[features.inputs]"), "needs a default for"),
        (("[features.inputs]", "lookup_timeout_ms = 0\n[features.inputs]"), "lookup_timeout_ms must be > 0"),
        (("[features.inputs]", "cache_size = 0\n[features.inputs]"), "cache_size >= 1"),
        (("[features.inputs]", "cache_ttl_s = true\n[features.inputs]"), "'cache_ttl_s' must be a float"),
        (("[features]", "prediction_cache_size = -1\n[features]"), "'prediction_cache_size' must be >= 0"),
    ],
)
def test_invalid_features_name_the_problem(tmp_path: Path, edit: tuple[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(tmp_path, FEATURES.replace(*edit))
    assert "inferd.toml" in caught.value.message
    assert fragment in caught.value.message


def test_a_bad_model_config_says_what_tf_serving_says() -> None:
    with pytest.raises(
        ConfigError, match=r"Error parsing text-format tensorflow\.serving\.ModelServerConfig"
    ):
        parse_model_config("improperly formatted file")


def test_grpc_channel_arguments_become_server_options() -> None:
    text = "grpc.max_connection_age_ms=2000, grpc.lb_policy_name=grpclb,,grpc.so_reuseaddr=1"
    assert channel_arguments(text) == [
        ("grpc.max_connection_age_ms", 2000),
        ("grpc.lb_policy_name", "grpclb"),
        ("grpc.so_reuseaddr", 1),
    ]
    assert channel_arguments("") == []
    # past a C int, a string (as TF Serving passes it), which gRPC ignores: an int failed the start
    assert channel_arguments("grpc.max_connection_age_ms=3000000000") == [
        ("grpc.max_connection_age_ms", "3000000000")
    ]
    with pytest.raises(ConfigError, match=r"expected key=value, got 'grpc\.x'"):
        channel_arguments("grpc.x")


def test_server_flags_fill_what_inferd_toml_leaves_unset() -> None:
    config = ServerConfig(
        saved_model_tags="serve,gpu",
        tensorflow_session_parallelism=4,
        tensorflow_inter_op_parallelism=2,
        num_request_iterations_for_warmup=3,
        prefer_tflite_model=True,
    )
    own = ModelSettings(runtime_tables={"onnx": {"intra_op_num_threads": 1}})
    settings = with_server_flags(own, config)
    assert settings.options("tensorflow") == {
        "tags": "serve,gpu",
        "intra_op_parallelism": 4,
        "inter_op_parallelism": 2,
        "warmup_iterations": 3,
    }
    assert settings.options("onnx") == {"intra_op_num_threads": 1, "inter_op_num_threads": 2}
    assert settings.prefer_tflite
    assert settings.warmup
    off = with_server_flags(ModelSettings(), ServerConfig(enable_model_warmup=False))
    assert not off.warmup
    assert off.options("tensorflow")["warmup_iterations"] == 0
    assert "onnx" not in off.runtime_tables


def test_worker_count_takes_whole_numbers_and_auto() -> None:
    assert worker_count("3") == 3
    assert worker_count("auto") == len(os.sched_getaffinity(0))
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ConfigError, match="--workers: expected a whole number"):
            worker_count(bad)


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("rest_api_port", 70000, "--rest_api_port must be from 0 to 65535, got 70000"),
        ("port", -1, "--port must be from 0 to 65535, got -1"),
        ("rest_api_num_threads", -7, "--rest_api_num_threads must be >= 1, got -7"),
        ("rest_api_timeout_in_ms", 0, "--rest_api_timeout_in_ms must be >= 1, got 0"),
        ("max_request_bytes", -7, "--max_request_bytes must be >= 1, got -7"),
        ("max_header_bytes", 0, "--max_header_bytes must be >= 1, got 0"),
        ("model_cache_bytes", -7, "--model_cache_bytes must be >= 0, got -7"),
        ("decode_processes", -1, "--decode_processes must be >= 0, got -1"),
        ("max_in_flight", 0, "--max_in_flight must be >= 1, got 0"),
        ("otel_sample_rate", 1.5, "--otel_sample_rate must be from 0 to 1, got 1.5"),
        ("drain_timeout_s", -7.0, "--drain_timeout_s must be >= 0, got -7.0"),
        ("num_load_threads", 0, "--num_load_threads must be >= 1, got 0"),
        ("load_wait_ms", -7, "--load_wait_ms must be >= 0, got -7"),
        ("keep_alive_timeout_s", float("nan"), "--keep_alive_timeout_s must be a number, got nan"),
        ("file_system_poll_wait_seconds", float("nan"), "--file_system_poll_wait_seconds must be a number"),
    ],
)
def test_server_options_out_of_range_are_refused_naming_the_flag(
    option: str, value: float, said: str
) -> None:
    """Each of these used to start a server that misbehaved (a negative body limit refused every
    request; NaN poll waits read the folders once) or ended in a traceback (threads)."""
    with pytest.raises(ConfigError) as refused:
        ServerConfig(**{option: value})
    assert said in refused.value.message


def test_tf_serving_values_outside_inferds_own_reading_still_start() -> None:
    """TF Serving takes a negative poll wait (no polling) and warm-up count (none extra)."""
    config = ServerConfig(
        file_system_poll_wait_seconds=-1,
        model_config_file_poll_wait_seconds=-1,
        num_request_iterations_for_warmup=-1,
        header_timeout_s=float("inf"),
    )
    assert config.file_system_poll_wait_seconds == -1
