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


def test_a_change_of_one_weight_moves_keys_only_to_or_from_that_version() -> None:
    """Three versions: the keys that move when the canary (3) grows all go to it, and when the old
    version (1) shrinks all leave it; no key moves between the two whose weights stayed. (With the
    versions on consecutive intervals of [0, 1), 1:50, 2:25, 3:25 -> 1:45, 2:25, 3:30 moved about
    500 of 10,000 keys from 1 to 2 and 500 from 2 to 3.)"""
    keys = [f"user-{i}" for i in range(10_000)]
    labels = {"old": 1, "stable": 2, "canary": 3}

    def route(
        weights: dict[str, float], available: frozenset[int] = frozenset({1, 2, 3})
    ) -> dict[str, int | None]:
        split = resolve(weights, labels)
        assert split is not None
        return {k: split.choose(k, available) for k in keys}

    before = route({"old": 50, "stable": 25, "canary": 25})
    for after, only in [
        (route({"old": 50, "stable": 25, "canary": 35}), {(1, 3), (2, 3)}),
        (route({"old": 40, "stable": 25, "canary": 25}), {(1, 2), (1, 3)}),
        (route({"old": 50, "stable": 25, "canary": 25}, frozenset({2, 3})), {(1, 2), (1, 3)}),
    ]:
        moves = {(before[k], after[k]) for k in keys if before[k] != after[k]}
        assert moves == only
    shares = [sum(v == n for v in before.values()) / len(keys) for n in (1, 2, 3)]
    assert shares == pytest.approx([0.5, 0.25, 0.25], abs=0.02)
