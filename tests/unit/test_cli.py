"""The serve command's flags: every server option can be set, by flag or by environment."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from inferd.cli import _serve_parser
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
    assert parser.parse_args(["serve", "--load_threads=3"]).load_threads == 3
    monkeypatch.setenv("INFERD_LOAD_THREADS", "5")
    assert serve_parser().parse_args(["serve"]).load_threads == 5
