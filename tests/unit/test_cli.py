"""The serve command's flags: every server option can be set, by flag or by environment."""

from __future__ import annotations

import argparse
from dataclasses import fields

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
    ("argv", "message"),
    [
        (["--step_s=nan"], "argument --step_s: expected a finite number, got 'nan'"),
        (["--step_s=inf"], "argument --step_s: expected a finite number, got 'inf'"),
        (["--steps=nan,100"], "--steps must be comma-separated percents, got 'nan,100'"),
    ],
)
def test_a_rollout_refuses_numbers_json_cannot_carry_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # They were sent as NaN/Infinity, and the server answered "the body is not valid JSON".
    with pytest.raises(SystemExit) as stopped:
        main(["rollout", "m", "--to=2", "--url=http://127.0.0.1:1", *argv])
    assert message in f"{stopped.value.code} {capsys.readouterr().err}"
