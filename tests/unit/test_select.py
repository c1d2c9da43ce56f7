"""``inferd.select`` pieces on their own: requirements, the choice, metrics, candidates, promotion,
and the report writers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from inferd.config import read_model_config_file
from inferd.errors import InvalidArgument
from inferd.select import Result, Selection, SelectOptions, report
from inferd.select import promote as promotion
from inferd.select.candidates import resolve
from inferd.select.choose import choose, parse_requirement
from inferd.select.compatibility import compare
from inferd.select.objectives import objective
from inferd.types import Method, Signature, TensorSpec
from tests.models import write_onnx_affine, write_sklearn_digits

ACCURACY = objective("accuracy")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("p99_ms<=5", ("p99_ms", "<=", 5.0)),
        (" size_mb < 2.5 ", ("size_mb", "<", 2.5)),
        ("throughput_rps>=1e3", ("throughput_rps", ">=", 1000.0)),
        ("accuracy>.9", ("accuracy", ">", 0.9)),
        ("cost_per_million<=0.10", ("cost_per_million", "<=", 0.1)),
    ],
)
def test_requirements_parse(text: str, expected: tuple[str, str, float]) -> None:
    parsed = parse_requirement(text, ACCURACY, with_price=True, with_url=False)
    assert (parsed.metric, parsed.op, parsed.bound) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("p99_ms=5", "expected <metric><op><number>"),
        ("p99_ms<=", "expected <metric><op><number>"),
        ("p99_ms<=5ms", "expected <metric><op><number>"),
        ("<=5", "expected <metric><op><number>"),
        ("p99<=5", "unknown metric 'p99'; expected one of ['p50_ms'"),
        ("f1>=0.9", "unknown metric 'f1'"),  # not the optimizing metric of this run
        ("cost_per_million<=1", "needs --price-per-hour"),
        ("server_p99_ms<=1", "give --url"),
    ],
)
def test_bad_requirements_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match="--require") as caught:
        parse_requirement(text, ACCURACY, with_price=False, with_url=False)
    assert message in caught.value.message


def _figures(accuracy: float, p99_ms: float, size_mb: float) -> dict[str, float | None]:
    return {"accuracy": accuracy, "p99_ms": p99_ms, "size_mb": size_mb}


def test_choose_the_best_that_meets_every_budget_and_say_why_others_lost() -> None:
    requirements = [parse_requirement(t, ACCURACY, False, False) for t in ("p99_ms<=5", "size_mb<=2")]
    figures = {
        "big": _figures(0.99, 1.0, 40.0),
        "slow": _figures(0.97, 7.2, 1.0),
        "small": _figures(0.95, 1.0, 1.0),
        "smaller": _figures(0.91, 0.5, 0.5),
        "tie": _figures(0.95, 1.0, 1.0),
    }
    verdicts = {v.name: v for v in choose(figures, {"broken": "no model.onnx"}, ACCURACY, requirements)}
    assert [n for n, v in verdicts.items() if v.won] == ["small"]
    assert verdicts["big"].reasons == ("size_mb 40 > 2",)
    assert verdicts["slow"].reasons == ("p99_ms 7.2 > 5",)
    assert verdicts["smaller"].reasons == ("accuracy 0.91 < winner's 0.95",)
    assert verdicts["tie"].reasons == ("accuracy 0.95 ties winner's 0.95; the earlier candidate wins",)
    assert verdicts["broken"].reasons == ("failed: no model.onnx",)
    assert not verdicts["broken"].qualified
    assert verdicts["smaller"].qualified


def test_choose_minimises_error_metrics_and_reports_no_winner() -> None:
    rmse = objective("rmse")
    requirement = parse_requirement("rmse<0.5", rmse, False, False)
    verdicts = choose({"a": {"rmse": 0.7}, "b": {"rmse": 0.6}}, {}, rmse, [])
    assert [v.name for v in verdicts if v.won] == ["b"]
    assert verdicts[0].reasons == ("rmse 0.7 > winner's 0.6",)
    none = choose({"a": {"rmse": 0.7}, "b": {"rmse": 0.6}}, {}, rmse, [requirement])
    assert not any(v.won for v in none)
    assert [v.reasons for v in none] == [("rmse 0.7 >= 0.5",), ("rmse 0.6 >= 0.5",)]


LABELS = np.array([0, 1, 2, 2, 1, 0])
PROBABILITIES = np.array(
    [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]],
    dtype=np.float32,
)


def test_classification_metrics_use_the_label_output_or_the_argmax() -> None:
    from sklearn import metrics

    predicted = PROBABILITIES.argmax(axis=1)
    assert objective("accuracy").score(LABELS, {"probabilities": PROBABILITIES}) == (5 / 6, "probabilities")
    onnx_like = {"label": predicted.astype(np.int64), "probabilities": PROBABILITIES}
    assert objective("accuracy").score(LABELS, onnx_like) == (5 / 6, "label")
    f1, _ = objective("f1").score(LABELS, onnx_like)
    assert f1 == pytest.approx(metrics.f1_score(LABELS, predicted, average="macro"))
    micro, _ = objective("recall", average="micro").score(LABELS, onnx_like)
    assert micro == pytest.approx(5 / 6)
    auc, name = objective("auc").score(LABELS, onnx_like)
    assert name == "probabilities"
    assert auc == pytest.approx(metrics.roc_auc_score(LABELS, PROBABILITIES, multi_class="ovr"))


def test_binary_auc_takes_the_positive_column_and_string_labels_compare_as_text() -> None:
    truth = np.array([0, 1, 1, 0])
    scores = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.8, 0.2]], dtype=np.float32)
    assert objective("auc").score(truth, {"scores": scores})[0] == pytest.approx(1.0)
    text_labels = np.array(["cat", "dog"], dtype=object)
    assert objective("accuracy").score(text_labels, {"predictions": np.array([b"cat", b"cat"])})[0] == 0.5


def test_regression_metrics_are_lower_is_better() -> None:
    truth = np.array([1.0, 2.0, 4.0])
    outputs = {"outputs": np.array([[1.0], [2.5], [3.0]], dtype=np.float32)}
    assert objective("mae").score(truth, outputs)[0] == pytest.approx(0.5)
    assert objective("rmse").score(truth, outputs)[0] == pytest.approx(np.sqrt((0.25 + 1.0) / 3))
    assert not objective("mae").higher_is_better
    assert objective("mae", direction="max").higher_is_better


@pytest.mark.parametrize(
    ("spec", "labels", "outputs", "message"),
    [
        ("mae", np.array(["cat", "dog"]), {"y": np.array([1.0, 2.0])}, "could not convert string to float"),
        ("rmse", np.array([1.0, 2.0]), {"y": np.array([np.nan, 2.0])}, "contains NaN"),
        ("accuracy", np.array([1, 2]), {"y": np.array([np.nan, 2.0])}, "contains NaN"),
        ("auc", np.array([1, 1]), {"p": np.array([[0.2, 0.8], [0.3, 0.7]])}, "is nan, not a number"),
    ],
)
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_labels_or_outputs_a_built_in_metric_cannot_take_are_refused_not_raised_or_nan(
    spec: str, labels: np.ndarray, outputs: dict[str, np.ndarray], message: str
) -> None:
    """Text labels for mae, NaN predictions and a one-class auc were a ValueError traceback from
    ``inferd select``, or a NaN that won the selection."""
    with pytest.raises(InvalidArgument, match=f"--optimize {spec}.*{message}"):
        objective(spec).score(labels, outputs)


def test_output_can_be_named_and_unknown_outputs_are_refused() -> None:
    outputs = {"a": np.array([0, 1]), "b": np.array([1, 1])}
    assert objective("accuracy", output="b").score(np.array([1, 1]), outputs) == (1.0, "b")
    with pytest.raises(InvalidArgument, match=r"--output 'c': the model has outputs \['a', 'b'\]"):
        objective("accuracy", output="c").score(np.array([1, 1]), outputs)
    with pytest.raises(InvalidArgument, match="fits mae; name the one to score with --output"):
        objective("mae").score(np.array([1.0]), {"x": np.zeros((1, 3), dtype=np.float32)})


def test_user_functions_from_a_file_and_from_a_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = "import numpy as np\n\ndef hits(y_true, y_pred):\n    return float(np.sum(y_true == y_pred))\n"
    (tmp_path / "scoring.py").write_text(source)
    (tmp_path / "my_scoring.py").write_text(source)
    from_file = objective(f"{tmp_path / 'scoring.py'}:hits")
    assert (from_file.name, from_file.higher_is_better) == ("hits", True)
    assert from_file.score(LABELS, {"label": np.roll(LABELS, 1)}) == (2.0, "label")
    monkeypatch.syspath_prepend(str(tmp_path))
    from_module = objective("my_scoring:hits", direction="min")
    assert not from_module.higher_is_better
    assert from_module.score(LABELS, {"label": LABELS}) == (6.0, "label")
    sys.modules.pop("my_scoring", None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("accuracyy", "unknown metric 'accuracyy'"),
        ("missing.py:f", "cannot import missing.py"),
        ("json:no_such_function", "json has no function 'no_such_function'"),
        ("no_such_module_here:f", "cannot import no_such_module_here"),
    ],
)
def test_bad_optimize_specs(spec: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match="--optimize") as caught:
        objective(spec)
    assert message in caught.value.message


def test_a_user_function_that_fails_or_returns_nan_is_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "def boom(y, p):\n    raise RuntimeError('no')\n\ndef nan(y, p):\n    return float('nan')\n"
    )
    with pytest.raises(InvalidArgument, match="raised RuntimeError: no"):
        objective(f"{tmp_path / 'bad.py'}:boom").score(LABELS, {"label": LABELS})
    with pytest.raises(InvalidArgument, match="returned nan, expected a finite number"):
        objective(f"{tmp_path / 'bad.py'}:nan").score(LABELS, {"label": LABELS})


def test_candidates_resolve_from_variants_base_paths_and_version_folders(tmp_path: Path) -> None:
    write_onnx_affine(tmp_path / "models" / "affine" / "1", 1.0)
    write_onnx_affine(tmp_path / "models" / "affine" / "3", 3.0)
    write_onnx_affine(tmp_path / "out" / "fp16", 2.0)
    (tmp_path / "out" / "variants.json").write_text(
        json.dumps(
            [
                {"name": "fp16", "path": "fp16", "ok": True, "error": None},
                {"name": "int8", "path": "int8", "ok": False, "error": "quantisation failed"},
            ]
        )
    )
    found = resolve(
        [
            tmp_path / "models" / "affine",
            tmp_path / "models" / "affine" / "1",
            tmp_path / "out",
            tmp_path / "out" / "fp16",
        ]
    )
    assert [(c.name, c.path) for c in found] == [
        ("affine", tmp_path / "models" / "affine" / "3"),
        ("affine/1", tmp_path / "models" / "affine" / "1"),
        ("fp16", tmp_path / "out" / "fp16"),
        ("fp16#2", tmp_path / "out" / "fp16"),
    ]
    assert found[1].plan.name == "affine_1"


def test_bad_candidates_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"candidate .*nowhere: expected a model, version or variants"):
        resolve([tmp_path / "nowhere"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "variants.json").write_text('{"name": "x"}')
    with pytest.raises(InvalidArgument, match=r"variants\.json: expected a JSON list"):
        resolve([tmp_path / "out"])
    (tmp_path / "out" / "variants.json").write_text('[{"name": "x", "path": "x", "ok": false}]')
    with pytest.raises(InvalidArgument, match="no candidates"):
        resolve([tmp_path / "out"])


def _config(tmp_path: Path, policy: str) -> tuple[Path, Path]:
    base = tmp_path / "repo" / "digits"
    write_onnx_affine(base / "1", 1.0)
    config = tmp_path / "models.config"
    config.write_text(
        f'model_config_list {{ config {{ name: "digits" base_path: "{base}" {policy} '
        'version_labels { key: "stable" value: 1 } } }\n'
    )
    return base, config


def test_promotion_plans_the_next_version_and_moves_the_label(tmp_path: Path) -> None:
    base, config = _config(tmp_path, "model_version_policy { latest { num_versions: 2 } }")
    winner = tmp_path / "winner"
    write_onnx_affine(winner, 2.0)
    planned = promotion.plan(base, "stable", config)
    assert planned.version == 2
    text = planned.describe(winner)
    assert f"copy {winner} -> {base}/.inferd-promote-2-" in text
    assert f"rename {base}/.inferd-promote-2-" in text
    assert "+      value: 2" in text
    assert sorted(p.name for p in base.iterdir()) == ["1"]  # planning changes nothing
    promotion.apply(planned, winner)
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]
    assert (base / "2" / "model.onnx").read_bytes() == (winner / "model.onnx").read_bytes()
    (model,) = read_model_config_file(config)
    assert dict(model.labels) == {"stable": 2}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_promotion_adds_the_version_to_a_specific_policy(tmp_path: Path) -> None:
    base, config = _config(tmp_path, "model_version_policy { specific { versions: 1 } }")
    winner = tmp_path / "winner"
    write_onnx_affine(winner, 2.0)
    planned = promotion.plan(base, "stable", config)
    assert "version 2 is added to the specific versions" in planned.describe(winner)
    (with_version,) = read_model_config_file(_written(tmp_path, planned.config_with_version))
    assert with_version.version_policy is not None
    assert with_version.version_policy.versions == (1, 2)
    assert dict(with_version.labels) == {"stable": 1}  # the label waits for the version
    promotion.apply(planned, winner)
    (model,) = read_model_config_file(config)
    assert model.version_policy is not None
    assert (model.version_policy.versions, dict(model.labels)) == ((1, 2), {"stable": 2})


def _written(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "check.config"
    path.write_text(text)
    return path


def test_promotion_warns_when_only_the_latest_version_is_served(tmp_path: Path) -> None:
    base, config = _config(tmp_path, "")
    assert any(
        "serves only its latest version" in note for note in promotion.plan(base, "stable", config).notes
    )


def test_promotion_refusals(tmp_path: Path) -> None:
    base, config = _config(tmp_path, "")
    with pytest.raises(InvalidArgument, match="labels are moved in the model config file"):
        promotion.plan(base, "stable", None)
    with pytest.raises(InvalidArgument, match="must match"):
        promotion.plan(base, "not-a-label", config)
    with pytest.raises(InvalidArgument, match="no model has base_path"):
        promotion.plan(tmp_path / "elsewhere" / "other", "stable", config)
    planned = promotion.plan(base, None, None)
    write_onnx_affine(base / "2", 2.0)  # another promotion got there first
    with pytest.raises(InvalidArgument, match="appeared while copying"):
        promotion.apply(planned, base / "1")
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]


def test_promotion_refuses_a_config_file_edited_since_it_was_planned(tmp_path: Path) -> None:
    base, config = _config(tmp_path, "model_version_policy { all {} }")
    planned = promotion.plan(base, "stable", config)
    edited = config.read_text().replace('key: "stable"', 'key: "canary"')
    config.write_text(edited)  # someone moved a label while the candidates were measured
    with pytest.raises(InvalidArgument, match="changed while the candidates were measured"):
        promotion.apply(planned, base / "1")
    assert sorted(p.name for p in base.iterdir()) == ["1"]
    assert config.read_text() == edited


def test_promotion_without_label_creates_the_model_folder(tmp_path: Path) -> None:
    winner = tmp_path / "winner"
    write_onnx_affine(winner, 2.0)
    (winner / "inferd.toml").write_text('runtime = "onnx"\n')
    planned = promotion.plan(tmp_path / "repo" / "new", None, None)
    assert planned.version == 1
    text = planned.describe(winner)
    assert "does not exist yet; it is created" in text
    assert "the model's settings are read from" in text
    promotion.apply(planned, winner)
    assert (tmp_path / "repo" / "new" / "1" / "model.onnx").is_file()


def _outcome(tmp_path: Path) -> Selection:
    goal = objective("accuracy")
    requirements = (parse_requirement("p99_ms<=5", goal, False, False),)
    write_onnx_affine(tmp_path / "a", 1.0)
    write_onnx_affine(tmp_path / "b", 1.0)
    a, b = resolve([tmp_path / "a", tmp_path / "b"])
    results = (
        Result(a, {**_figures(0.9, 2.0, 0.1), "throughput_rps": 1000.0}, {"output": "y"}),
        Result(b, {**_figures(0.95, 9.0, 0.1), "throughput_rps": 800.0}, {"output": "y"}),
    )
    verdicts = choose({r.candidate.name: r.figures for r in results}, {}, goal, requirements)
    machine: dict[str, object] = {
        "host": "h",
        "machine": "x86_64",
        "cpus": 2,
        "python": "3.11",
        "measured_at": "now",
    }
    options = SelectOptions((tmp_path / "a", tmp_path / "b"), "v.csv", "y", "accuracy", ("p99_ms<=5",))
    return Selection(goal, requirements, results, tuple(verdicts), machine, options)


def test_report_json_markdown_table_and_plot(tmp_path: Path) -> None:
    outcome = _outcome(tmp_path)
    document = json.loads(report.to_json(outcome))
    assert document["winner"] == "a"
    assert document["optimize"] == {"metric": "accuracy", "spec": "accuracy", "higher_is_better": True}
    assert [c["reasons"] for c in document["candidates"]] == [[], ["p99_ms 9 > 5"]]
    text = report.markdown(outcome)
    assert "Winner: **a**" in text
    assert "| b | 0.95 | - | - | 9 | 800 |" in text
    assert "p99_ms 9 > 5 |" in text
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(report.table(outcome))
    assert "p99_ms 9 > 5" in console.export_text()
    report.plot(outcome, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("asked", "scores", "expected"),
    [(None, True, "predict_proba"), (None, False, "serving_default"), ("classify", True, "classify")],
)
def test_auc_calls_predict_proba_where_a_model_has_it(
    tmp_path: Path, asked: str | None, scores: bool, expected: str
) -> None:
    import asyncio

    from inferd.local import in_process
    from inferd.select.measure import Job, _signature_name

    write_sklearn_digits(tmp_path / "digits" / "1")
    (candidate,) = resolve([tmp_path / "digits"])
    job = Job(candidate, "v.csv", "y", asked, scores, 0, 1, 0.1, 0.1)

    async def chosen() -> str:
        async with in_process(candidate.plan, threads=1) as loaded:
            return _signature_name(loaded.service, loaded.ref, job)

    assert asyncio.run(chosen()) == expected


def _sig(
    name: str, outputs: dict[str, str], x: str = "float32", method: Method = Method.PREDICT
) -> Signature:
    return Signature(
        name,
        (TensorSpec("x", np.dtype(x), (-1, 4)),),
        tuple(TensorSpec(n, np.dtype(d), (-1,)) for n, d in outputs.items()),
        method,
    )


def test_the_same_api_has_no_changes() -> None:
    api = {"serving_default": _sig("serving_default", {"y": "float32"})}
    assert compare(api, dict(api)) == []


def test_every_kind_of_api_change_is_listed() -> None:
    before = {
        "serving_default": _sig("serving_default", {"y": "float32"}),
        "proba": _sig("proba", {"p": "float32"}),
        "classify": _sig("classify", {"classes": "int64", "scores": "float32"}, method=Method.CLASSIFY),
    }
    after = {
        "serving_default": _sig("serving_default", {"y": "float64", "z": "float32"}, x="int64"),
        "classify": _sig("classify", {"classes": "int64", "scores": "float32"}),
        "extra": _sig("extra", {"y": "float32"}),
    }
    assert compare(before, after) == [
        "signature 'proba' is removed",
        "signature 'extra' is added",
        "signature 'serving_default': input 'x': FP32 [-1, 4] -> INT64 [-1, 4]",
        "signature 'serving_default': output 'z' (FP32 [-1]) is added",
        "signature 'serving_default': output 'y': FP32 [-1] -> FP64 [-1]",
        "signature 'serving_default': :predict answers one output ('y': the bare values) -> "
        "2 outputs (['y', 'z']: an object per row)",
        f"signature 'classify': method {Method.CLASSIFY.value} -> {Method.PREDICT.value}",
    ]


def test_a_report_file_that_cannot_be_written_is_refused_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--json`` into a folder that does not exist was a FileNotFoundError traceback after every
    candidate was measured; it is refused before, and a file that still cannot be written (a
    folder there) is named, exit 2."""
    from inferd.select import command

    outcome = _outcome(tmp_path)
    missing = tmp_path / "no-such-folder" / "report.json"
    assert command.execute(outcome.options, command.Outputs(json=missing), None) == command.BAD_INPUT
    assert f"--json {missing}: there is no folder {missing.parent} to write it in" in capsys.readouterr().err
    monkeypatch.setattr(command, "run", lambda options: outcome)
    (tmp_path / "a-folder.md").mkdir()
    outputs = command.Outputs(markdown=tmp_path / "a-folder.md")
    assert command.execute(outcome.options, outputs, None) == command.BAD_INPUT
    assert f"cannot write the report to {tmp_path / 'a-folder.md'}: Is a directory" in capsys.readouterr().err


def test_a_promotion_into_a_file_or_of_a_folder_that_does_not_copy_is_refused(tmp_path: Path) -> None:
    """``--promote`` naming a file was a FileExistsError traceback after the measurement; a copy
    that failed part way was a traceback that left the partial copy in the base path."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InvalidArgument, match="expected a model's base path \\(a folder\\), found a file"):
        promotion.plan(tmp_path / "a-file", None, None)
    winner = tmp_path / "winner"
    write_onnx_affine(winner, 2.0)
    (winner / "gone").symlink_to(tmp_path / "no-such-file")
    planned = promotion.plan(tmp_path / "repo" / "m", None, None)
    with pytest.raises(
        InvalidArgument, match=f"cannot copy {winner} into {planned.base}: {winner / 'gone'}: .*No such file"
    ):
        promotion.apply(planned, winner)
    assert sorted(p.name for p in planned.base.iterdir()) == []
