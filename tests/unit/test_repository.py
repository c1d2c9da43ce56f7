"""Version discovery on disk, content fingerprints, and the two-scan stability rule."""

from __future__ import annotations

import logging
import os
import py_compile
from pathlib import Path

import pytest

from inferd.config import ServerConfig, VersionPolicy
from inferd.errors import ConfigError
from inferd.repository import Repository, fingerprint, list_versions, scan_versions


def make_version(folder: Path, content: bytes = b"weights") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(content)
    return folder


# list_versions


def test_list_versions_takes_integer_folders_only(tmp_path: Path) -> None:
    for name in ("1", "2", "10", "tmp-upload", ".3", "4.tmp", "_5", "6~", "v7", "-8", "1e3", "٣"):
        (tmp_path / name).mkdir()
    (tmp_path / "9").write_text("a file, not a version folder")
    (tmp_path / "inferd.toml").write_text("")
    assert list_versions(tmp_path) == {1: tmp_path / "1", 2: tmp_path / "2", 10: tmp_path / "10"}


def test_leading_zeros_name_the_same_number_and_the_first_name_wins(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("00000123", "0042", "42"):
        (tmp_path / name).mkdir()
    assert list_versions(tmp_path) == {123: tmp_path / "00000123", 42: tmp_path / "0042"}
    assert "both name version 42" in caplog.text


def test_a_version_past_int64_is_ignored_and_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("1", str(2**63 - 1), str(2**63), "0" + str(2**63)):
        (tmp_path / name).mkdir()
    ignored: set[Path] = set()
    with caplog.at_level(logging.WARNING, logger="inferd.repository"):
        assert sorted(scan_versions(tmp_path, ignored)) == [1, 2**63 - 1]
        assert sorted(scan_versions(tmp_path, ignored)) == [1, 2**63 - 1]
    warnings = [r.getMessage() for r in caplog.records if "must fit in int64" in r.getMessage()]
    assert len(warnings) == 2  # one per folder, not one per scan


def test_a_missing_base_path_has_no_versions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert list_versions(tmp_path / "absent") == {}
    assert "cannot list" in caplog.text


def test_a_symlinked_version_folder_counts(tmp_path: Path) -> None:
    make_version(tmp_path / "elsewhere")
    (tmp_path / "base").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "base" / "3")
    assert list(list_versions(tmp_path / "base")) == [3]


# fingerprint


def test_fingerprint_is_stable_for_unchanged_content(tmp_path: Path) -> None:
    folder = make_version(tmp_path / "1")
    (folder / "sub").mkdir()
    (folder / "sub" / "vocab.txt").write_text("a b c")
    assert fingerprint(folder) == fingerprint(folder)


def test_fingerprint_changes_with_size_mtime_names_and_nested_files(tmp_path: Path) -> None:
    folder = make_version(tmp_path / "1", b"abc")
    model = folder / "model.onnx"
    seen = {fingerprint(folder)}

    model.write_bytes(b"abcd")  # size
    seen.add(fingerprint(folder))

    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # mtime only, same size
    seen.add(fingerprint(folder))

    model.rename(folder / "renamed.onnx")  # name
    seen.add(fingerprint(folder))

    (folder / "variables").mkdir()  # a file deeper down
    (folder / "variables" / "data").write_bytes(b"")
    seen.add(fingerprint(folder))

    assert len(seen) == 5


def test_fingerprint_leaves_out_the_bytecode_that_loading_a_python_model_writes(tmp_path: Path) -> None:
    folder = tmp_path / "1"
    folder.mkdir()
    (folder / "model.py").write_text("def predict(x):\n    return x\n")
    before = fingerprint(folder)
    py_compile.compile(str(folder / "model.py"))  # what importing it writes, unless told not to
    assert (folder / "__pycache__").is_dir()
    assert fingerprint(folder) == before
    (folder / "model.py").write_text("def predict(x):\n    return 2 * x\n")
    assert fingerprint(folder) != before


def test_fingerprint_of_an_empty_or_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert fingerprint(tmp_path / "empty") == fingerprint(tmp_path / "absent")
    assert fingerprint(tmp_path / "empty") != fingerprint(make_version(tmp_path / "full"))


# Repository.scan


def repository(base: Path, poll_s: float = 1.0) -> Repository:
    """One model ``m`` at ``base``; ``poll_s`` > 0 requires two equal scans before loading."""
    return Repository(
        ServerConfig(model_name="m", model_base_path=str(base), file_system_poll_wait_seconds=poll_s)
    )


def aspired(repo: Repository, model: str = "m") -> dict[int, str]:
    plans = {plan.name: plan for plan in repo.scan()}
    return {v: source.fingerprint for v, source in plans[model].aspired.items()}


def test_a_version_is_aspired_only_after_two_scans_see_the_same_content(tmp_path: Path) -> None:
    make_version(tmp_path / "1")
    repo = repository(tmp_path)
    assert aspired(repo) == {}
    assert aspired(repo) == {1: fingerprint(tmp_path / "1")}

    make_version(tmp_path / "2", b"half")
    assert set(aspired(repo)) == {1}  # 2 is new: not yet
    (tmp_path / "2" / "model.onnx").write_bytes(b"half, then all of it")
    assert set(aspired(repo)) == {1}  # 2 changed since the last scan: still not
    assert aspired(repo) == {2: fingerprint(tmp_path / "2")}  # unchanged twice: latest 1 is 2


def test_without_polling_versions_are_aspired_at_the_first_scan(tmp_path: Path) -> None:
    make_version(tmp_path / "1")
    assert set(aspired(repository(tmp_path, poll_s=0))) == {1}


def test_without_polling_a_later_scan_still_waits_for_a_new_version_to_be_stable(tmp_path: Path) -> None:
    """A model config file poll (or an admin call) scans again when the folders are not polled:
    a version being copied meanwhile is not loaded half-written."""
    make_version(tmp_path / "1")
    repo = repository(tmp_path, poll_s=0)
    assert set(aspired(repo)) == {1}
    make_version(tmp_path / "2", b"half")
    assert set(aspired(repo)) == {1}
    assert set(aspired(repo)) == {2}


def test_a_changing_version_that_was_stable_stays_aspired(tmp_path: Path) -> None:
    """Files changing inside a served version must not unload it (availability first)."""
    make_version(tmp_path / "1")
    repo = repository(tmp_path)
    aspired(repo)
    first = aspired(repo)
    assert set(first) == {1}
    (tmp_path / "1" / "log.txt").write_text("written while serving")
    assert aspired(repo) == first  # still aspired, with the content last seen stable
    assert aspired(repo) == {1: fingerprint(tmp_path / "1")}  # the new content once it settles


def test_a_deleted_version_drops_out_and_a_recreated_one_waits_again(tmp_path: Path) -> None:
    make_version(tmp_path / "1")
    make_version(tmp_path / "2")
    repo = repository(tmp_path)
    aspired(repo)
    assert set(aspired(repo)) == {2}
    (tmp_path / "2" / "model.onnx").unlink()
    (tmp_path / "2").rmdir()
    assert set(aspired(repo)) == {1}
    make_version(tmp_path / "2", b"new")
    assert set(aspired(repo)) == {1}
    assert set(aspired(repo)) == {2}


def test_a_model_whose_versions_all_wait_keeps_the_versions_it_served(tmp_path: Path) -> None:
    """A new base path (or a new only version) waits for its second scan; what was aspired
    stays aspired meanwhile, so that the model is never without a version to serve."""
    make_version(tmp_path / "a" / "1")
    make_version(tmp_path / "b" / "2")
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "m" base_path: "{tmp_path / "a"}" }} }}')
    repo = Repository(
        ServerConfig(
            model_config_file=str(config),
            model_config_file_poll_wait_seconds=1e-9,
            file_system_poll_wait_seconds=1,
        )
    )
    aspired(repo)
    assert aspired(repo) == {1: fingerprint(tmp_path / "a" / "1")}
    config.write_text(f'model_config_list {{ config {{ name: "m" base_path: "{tmp_path / "b"}" }} }}')
    assert aspired(repo) == {1: fingerprint(tmp_path / "a" / "1")}
    assert aspired(repo) == {2: fingerprint(tmp_path / "b" / "2")}

    make_version(tmp_path / "b" / "3")
    (tmp_path / "b" / "2" / "model.onnx").unlink()
    (tmp_path / "b" / "2").rmdir()
    assert set(aspired(repo)) == {2}
    assert set(aspired(repo)) == {3}


def test_the_policy_chooses_among_stable_versions(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        make_version(tmp_path / str(version))
    (tmp_path / "inferd.toml").write_text("version_policy = { specific = [1, 3] }\n[labels]\nstable = 1\n")
    repo = repository(tmp_path)
    aspired(repo)
    (plan,) = repo.scan()
    assert set(plan.aspired) == {1, 3}
    assert dict(plan.labels) == {"stable": 1}
    assert plan.error is None
    assert plan.settings.version_policy == VersionPolicy("specific", versions=(1, 3))


def test_a_bad_inferd_toml_is_reported_in_the_plan(tmp_path: Path) -> None:
    make_version(tmp_path / "1")
    (tmp_path / "inferd.toml").write_text("colour = 'red'\n")
    (plan,) = repository(tmp_path, poll_s=0).scan()
    assert plan.error is not None
    assert "unknown key(s) ['colour']" in plan.error
    assert set(plan.aspired) == {1}  # default policy; the manager fails new loads with the error


def test_a_bad_edit_of_inferd_toml_keeps_the_last_policy_labels_and_split(tmp_path: Path) -> None:
    # Before, the defaults stood in: policy latest, no labels, no split, so a typo in [traffic]
    # unloaded the stable version and sent every request to the newest one.
    for version in (1, 2):
        make_version(tmp_path / str(version))
    good = "version_policy = { all = true }\n[labels]\nstable = 1\n[traffic]\nstable = 100\n"
    (tmp_path / "inferd.toml").write_text(good)
    repo = repository(tmp_path, poll_s=0)
    repo.scan()
    (tmp_path / "inferd.toml").write_text(good.replace("stable = 100", "stable = -1"))
    (plan,) = repo.scan()
    assert plan.error is not None
    assert "weight of 'stable'" in plan.error
    assert set(plan.aspired) == {1, 2}
    assert dict(plan.labels) == {"stable": 1}
    assert plan.settings.traffic == {"stable": 100.0}


def test_model_config_file_policy_and_labels_win_over_inferd_toml(tmp_path: Path) -> None:
    base = tmp_path / "m"
    for version in (1, 2, 3):
        make_version(base / str(version))
    (base / "inferd.toml").write_text("version_policy = { latest = 1 }\n[labels]\nold = 3\n")
    config = tmp_path / "models.config"
    config.write_text(
        f'model_config_list {{ config {{ name: "m" base_path: "{base}" model_platform: "onnx" '
        'model_version_policy { all {} } version_labels { key: "stable" value: 2 } } }'
    )
    repo = Repository(ServerConfig(model_config_file=str(config), file_system_poll_wait_seconds=0))
    (plan,) = repo.scan()
    assert set(plan.aspired) == {1, 2, 3}
    assert dict(plan.labels) == {"stable": 2}
    assert plan.platform == "onnx"


def test_model_config_file_is_reread_and_a_broken_one_keeps_the_previous(tmp_path: Path) -> None:
    config = tmp_path / "models.config"
    config.write_text(f'model_config_list {{ config {{ name: "a" base_path: "{tmp_path / "a"}" }} }}')
    repo = Repository(
        ServerConfig(
            model_config_file=str(config),
            model_config_file_poll_wait_seconds=1e-9,
            file_system_poll_wait_seconds=0,
        )
    )
    assert [m.name for m in repo.model_configs()] == ["a"]
    config.write_text(f'model_config_list {{ config {{ name: "b" base_path: "{tmp_path / "b"}" }} }}')
    assert [m.name for m in repo.model_configs()] == ["b"]
    config.write_text("model_config_list { config { name: ")
    assert [m.name for m in repo.model_configs()] == ["b"]


def config_listing(path: Path, *names: str) -> None:
    entries = " ".join(f'config {{ name: "{n}" base_path: "{path.parent / n}" }}' for n in names)
    path.write_text(f"model_config_list {{ {entries} }}")


@pytest.mark.parametrize("poll_s", [0, 1e-9])
def test_replaced_models_hold_in_a_new_process_while_the_file_lists_what_they_replaced(
    tmp_path: Path, poll_s: float
) -> None:
    """As a worker restarted after a HandleReloadConfigRequest: the models are replaced before the
    file's first read, which ends them only when the file is polled and lists other models."""
    config = tmp_path / "models.config"
    config_listing(config, "a", "b")
    settings = ServerConfig(
        model_config_file=str(config),
        model_config_file_poll_wait_seconds=poll_s,
        file_system_poll_wait_seconds=0,
    )
    running = Repository(settings)
    listed = running.model_configs()
    restarted = Repository(settings)
    restarted.replace_models(listed[1:], replaced=listed)
    assert [m.name for m in restarted.model_configs()] == ["b"]
    assert restarted.replacing
    config_listing(config, "a", "b", "c")
    late = Repository(settings)
    late.replace_models(listed[1:], replaced=listed)
    for repo in (restarted, late):
        expected = ["a", "b", "c"] if poll_s else ["b"]
        assert [m.name for m in repo.model_configs()] == expected
        assert repo.replacing is not bool(poll_s)


def test_a_broken_model_config_file_at_start_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "models.config"
    config.write_text("model_config_list { config { name: ")
    repo = Repository(ServerConfig(model_config_file=str(config)))
    with pytest.raises(ConfigError, match=r"models\.config"):
        repo.scan()


def test_repository_mode_lists_model_folders(tmp_path: Path) -> None:
    for name in ("b", "a", ".hidden", "_private"):
        make_version(tmp_path / name / "1")
    (tmp_path / "README.md").write_text("not a model")
    repo = Repository(ServerConfig(repository=str(tmp_path), file_system_poll_wait_seconds=0))
    models = repo.model_configs()
    assert [(m.name, m.base_path) for m in models] == [("a", tmp_path / "a"), ("b", tmp_path / "b")]
    make_version(tmp_path / "c" / "1")
    assert [m.name for m in repo.model_configs()] == ["a", "b", "c"]


def test_a_repository_folder_that_cannot_be_listed_keeps_its_models_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "inferd.repository")
    root = tmp_path / "repo"
    make_version(root / "a" / "1")
    repo = Repository(ServerConfig(repository=str(root), file_system_poll_wait_seconds=0))
    served = aspired(repo, "a")
    assert set(served) == {1}
    root.rename(tmp_path / "away")
    for _ in range(3):
        assert aspired(repo, "a") == served
    assert caplog.text.count("cannot list model repository") == 1
    (tmp_path / "away").rename(root)
    assert [m.name for m in repo.model_configs()] == ["a"]
    assert f"model {root}: its folder can be read again" in caplog.text


def test_no_model_source_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no models"):
        Repository(ServerConfig()).scan()


# scan faults: what is on disk cannot be known, so the model keeps its last plan


def test_a_broken_version_link_is_a_fault_not_a_removal(tmp_path: Path) -> None:
    make_version(tmp_path / "base" / "1")
    os.symlink(tmp_path / "absent", tmp_path / "base" / "2")
    with pytest.raises(FileNotFoundError):
        scan_versions(tmp_path / "base")
    (tmp_path / "base" / "2").unlink()
    os.symlink(tmp_path / "base" / "1" / "model.onnx", tmp_path / "base" / "3")  # a link to a file
    assert list(scan_versions(tmp_path / "base")) == [1]


def test_a_model_whose_folder_cannot_be_listed_keeps_its_last_plan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "inferd.repository")
    make_version(tmp_path / "real" / "1")
    os.symlink(tmp_path / "real", tmp_path / "base")
    repo = repository(tmp_path / "base")
    aspired(repo)
    served = aspired(repo)
    assert set(served) == {1}
    (tmp_path / "real").rename(tmp_path / "moved")
    assert aspired(repo) == served
    assert aspired(repo) == served
    assert caplog.text.count("cannot list") == 1  # logged when it starts, not at every scan
    (tmp_path / "moved").rename(tmp_path / "real")
    make_version(tmp_path / "real" / "2")
    assert aspired(repo) == served  # the new version waits for a second look, as always
    assert set(aspired(repo)) == {2}
    assert "can be read again" in caplog.text


def test_a_model_never_listed_has_an_empty_plan_with_the_fault(tmp_path: Path) -> None:
    (plan,) = repository(tmp_path / "absent").scan()
    assert plan.aspired == {}
    assert plan.error is not None
    assert "cannot list" in plan.error


def test_safe_mode_reaches_every_plan(tmp_path: Path) -> None:
    make_version(tmp_path / "1")
    config = ServerConfig(model_name="m", model_base_path=str(tmp_path), safe=True)
    (plan,) = Repository(config).scan()
    assert plan.settings.safe
