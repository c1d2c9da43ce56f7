from __future__ import annotations

from pathlib import Path

import pytest

from inferd.config import read_model_settings
from inferd.errors import ConfigError
from inferd.traffic import Split, parse_weights, resolve


def test_resolve_maps_labels_and_numbers_to_shares_newest_first() -> None:
    split = resolve({"stable": 90, "canary": 10, "3": 0}, {"stable": 1, "canary": 2})
    assert split == Split(((2, 0.1), (1, 0.9)))
    assert resolve({"stable": 1, "1": 1}, {"stable": 1}) == Split(((1, 1.0),))
    assert resolve({"missing": 1}, {}) is None
    assert resolve({}, {"stable": 1}) is None


def test_huge_weights_whose_sum_overflows_still_split_by_their_ratio() -> None:
    # Their sum is inf: unscaled, every share was 0 (or NaN) and no request found a version.
    assert resolve({"stable": 1e308, "canary": 1e308}, {"stable": 1, "canary": 2}) == Split(
        ((2, 0.5), (1, 0.5))
    )
    assert resolve({"stable": 1e308, "1": 1e308, "2": 1e308}, {"stable": 1}) == Split(
        ((2, 1 / 3), (1, 2 / 3))
    )


def test_a_key_keeps_its_version_and_only_moves_to_a_growing_newer_version() -> None:
    keys = [f"user-{i}" for i in range(2000)]
    before = {k: Split(((2, 0.05), (1, 0.95))).choose(k, {1, 2}) for k in keys}
    assert before == {k: Split(((2, 0.05), (1, 0.95))).choose(k, {1, 2}) for k in keys}
    after = {k: Split(((2, 0.25), (1, 0.75))).choose(k, {1, 2}) for k in keys}
    assert all(after[k] == 2 for k in keys if before[k] == 2)
    assert 0.2 < sum(v == 2 for v in after.values()) / len(keys) < 0.3


def test_an_unavailable_version_gives_its_share_to_the_others() -> None:
    split = Split(((2, 0.5), (1, 0.5)))
    assert {split.choose(None, {1}) for _ in range(50)} == {1}
    assert split.choose("k", set()) is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"canary": -1}, "weight of 'canary' must be a finite number >= 0"),
        ({"canary": "ten"}, "weight of 'canary' must be a finite number >= 0"),
        ({"stable": 90, "canary": float("inf")}, "weight of 'canary' must be a finite number >= 0, got inf"),
        ({"canary": float("nan")}, "weight of 'canary' must be a finite number >= 0, got nan"),
        ({"can-ary": 1}, "must be a label"),
        ({"a": 0, "b": 0}, "at least one weight must be above 0"),
    ],
)
def test_bad_traffic_tables_name_the_key_and_the_expectation(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_weights(table, "[traffic]")


def test_the_traffic_table_is_read_from_inferd_toml(tmp_path: Path) -> None:
    (tmp_path / "inferd.toml").write_text('[traffic]\nstable = 90\n"7" = 10\n')
    assert read_model_settings(tmp_path).traffic == {"stable": 90.0, "7": 10.0}
    (tmp_path / "inferd.toml").write_text("traffic = 3\n")
    with pytest.raises(ConfigError, match=r"\[traffic\] must be a table"):
        read_model_settings(tmp_path)
