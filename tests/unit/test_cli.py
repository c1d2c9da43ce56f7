"""The serve command's flags: every server option can be set, by flag or by environment."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from inferd.cli import _batch_parser, _bench_parser, _optimize_parser, _select_parser, _serve_parser, main
from inferd.config import ServerConfig


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    _serve_parser(parser.add_subparsers(dest="command"))
    return parser


def test_every_server_option_has_a_serve_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = serve_parser()
    (serve,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {action.dest for action in serve.choices["serve"]._actions}
    assert [f.name for f in fields(ServerConfig) if f.name not in flags] == []
    assert parser.parse_args(["serve", "--num_load_threads=3"]).num_load_threads == 3
    monkeypatch.setenv("INFERD_NUM_LOAD_THREADS", "5")
    assert serve_parser().parse_args(["serve"]).num_load_threads == 5


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("INFERD_REST_API_PORT", "abc", "inferd serve: INFERD_REST_API_PORT: invalid int value: 'abc'"),
        ("INFERD_ENABLE_BATCHING", "maybe", "INFERD_ENABLE_BATCHING: expected true or false, got 'maybe'"),
        ("INFERD_LOG_LEVEL", "loud", "INFERD_LOG_LEVEL: invalid choice: 'loud'"),
    ],
)
def test_a_bad_environment_value_fails_serve_alone_naming_the_variable_and_a_flag_overrides_it(
    variable: str, value: str, said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to raise a traceback while the parsers were built, for every command."""
    monkeypatch.setenv(variable, value)
    assert main(["serve", "--model_name=m", "--model_base_path=/nowhere"]) == 2
    assert said in capsys.readouterr().err
    flag = "--" + variable.removeprefix("INFERD_").lower() + "=" + ("info" if "LEVEL" in variable else "1")
    assert main(["serve", flag, "--version"]) == 0
    with pytest.raises(SystemExit) as exit_:
        main(["batch", "--help"])
    assert exit_.value.code == 0


@pytest.mark.parametrize("command", ["batch", "bench", "select", "optimize"])
def test_flags_are_spelled_in_snake_case_and_kebab_case_stays_an_alias(command: str) -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for make in (_batch_parser, _bench_parser, _select_parser, _optimize_parser):
        make(sub)
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices[command]._actions:
        long = [flag for flag in action.option_strings if flag.startswith("--")]
        kebab = [flag for flag in long if "-" in flag[2:]]
        if long:
            assert "-" not in long[0][2:], f"{command} {long}: the first spelling is snake_case"
        assert all("--" + flag[2:].replace("-", "_") in long for flag in kebab), long
    snake = parser.parse_args(["batch", "m", "in.csv", "out.parquet", "--batch_size=8", "--keep_columns=a"])
    kebab = parser.parse_args(["batch", "m", "in.csv", "out.parquet", "--batch-size=8", "--keep-columns=a"])
    assert (snake.batch_size, snake.keep_columns) == (kebab.batch_size, kebab.keep_columns) == (8, "a")


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        ("--concurrency=4,a", "argument --concurrency: expected a whole number of 1 or more, got 'a'"),
        ("--concurrency=0", "argument --concurrency: expected a whole number of 1 or more, got '0'"),
        ("--rate=inf", "argument --rate: expected a finite number above 0, got 'inf'"),
        ("--duration=nan", "argument --duration: expected a finite number above 0, got 'nan'"),
        ("--timeout=0", "argument --timeout: expected a finite number above 0, got '0'"),
        ("--warmup=-1", "argument --warmup: expected a finite number of 0 or more, got '-1'"),
        ("--instances=-5", "argument --instances: expected a whole number of 1 or more, got '-5'"),
        ("--processes=0", "argument --processes: expected a whole number of 1 or more, got '0'"),
        ("--max_connections=0", "argument --max_connections/--max-connections: expected a whole number"),
        ("--price_per_hour=nan", "argument --price_per_hour/--price-per-hour: expected a finite number"),
    ],
)
def test_bench_refuses_numbers_it_cannot_use_naming_the_flag(
    flag: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "http://127.0.0.1:9", "--model=m", flag])
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err


def test_bench_refuses_a_payload_it_cannot_read_and_a_rate_it_cannot_keep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before it connects anywhere (port 9 answers nothing): these used to end in a traceback, or
    in an open loop that scheduled requests for minutes without sending one (``--rate=1e12``)."""
    (tmp_path / "not.npy").write_text("not an array")
    (tmp_path / "empty.npz").write_bytes(b"")
    for flag, said in [
        (f"--payload={tmp_path / 'absent.json'}", f"--payload {tmp_path / 'absent.json'}: [Errno 2]"),
        (f"--payload={tmp_path / 'not.npy'}", f"--payload {tmp_path / 'not.npy'}: "),
        (f"--payload={tmp_path / 'empty.npz'}", f"--payload {tmp_path / 'empty.npz'}: "),
        ("--rate=1e12", "rate: expected requests per second above 0 and at most 1,000,000, got 1e+12"),
    ]:
        assert main(["bench", "http://127.0.0.1:9", "--model=m", "--duration=1", flag]) == 2
        assert said in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["features", "load", "t.csv", "--store=redis://x", "--entity=id", "--chunk_rows=0"],
            "--chunk_rows: expected",
        ),
        (
            ["features", "load", "t.csv", "--store=redis://x", "--entity=id", "--ttl=-5"],
            "--ttl: expected a whole",
        ),
        (["rollout", "m", "--to=2", "--step_s=nan"], "--step_s: expected a finite number above 0, got 'nan'"),
        (["rollout", "m", "--to=-1"], "--to: expected a whole number of 0 or more, got '-1'"),
        (["select", "c", "--price_per_hour=-1"], "--price-per-hour: expected a finite number of 0 or more"),
        (["select", "c", "--batch_size=-2"], "--batch-size: expected a whole number of 0 or more"),
    ],
)
def test_other_commands_refuse_numbers_they_cannot_use(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A negative --ttl or --chunk_rows used to load features as if none was given."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err


def test_serve_refuses_an_option_out_of_range_before_it_starts() -> None:
    """``--rest_api_port=70000`` used to start a server (on port 4464); ``-7`` threads, a traceback."""
    for flag, said in [
        ("--rest_api_port=70000", "inferd: --rest_api_port must be from 0 to 65535, got 70000\n"),
        ("--rest_api_num_threads=-7", "inferd: --rest_api_num_threads must be >= 1, got -7\n"),
    ]:
        argv = [sys.executable, "-m", "inferd", "serve", "--model_base_path=/nonexistent", flag]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr) == (2, said)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--step_s=nan"], "argument --step_s: expected a finite number above 0, got 'nan'"),
        (["--step_s=inf"], "argument --step_s: expected a finite number above 0, got 'inf'"),
        (["--steps=nan,100"], "--steps must be comma-separated percents, got 'nan,100'"),
    ],
)
def test_a_rollout_refuses_numbers_json_cannot_carry_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # They were sent as NaN/Infinity, and the server answered "the body is not valid JSON".
    try:
        status = main(["rollout", "m", "--to=2", "--url=http://127.0.0.1:1", *argv])
    except SystemExit as stopped:  # argparse's own refusal
        status = stopped.code
    assert status == 2
    assert message in capsys.readouterr().err
