"""Which REST calls the cluster's admin log records and replays on every replica: the admin
calls that change what a replica serves outside the repository, and no read."""

from __future__ import annotations

import pytest

from inferd.ray.admin_log import is_change


@pytest.mark.parametrize(
    "path",
    [
        "/v2/repository/models/m/load",
        "/v2/repository/models/m/unload",
        "/v2/repository/models/m/rollout",
        "/v2/repository/models/m/rollout/pause",
        "/v2/repository/models/m/rollout/abort",
        "/dashboard/api/models/m/labels/stable",
        "/dashboard/api/models/m/rollout",
        "/dashboard/api/models/m/rollout/promote",
    ],
)
def test_admin_changes_are_replayed(path: str) -> None:
    assert is_change("POST", path)
    assert not is_change("GET", path)


@pytest.mark.parametrize(
    "path",
    [
        "/v2/repository/index",
        "/v2/repository/models/m/rollout/status",
        "/dashboard/api/models/m/rollout/status",
        "/dashboard/api/models",
        "/v1/models/m:predict",
        "/v2/models/m/infer",
        "/v2/repository/models/m/load/extra",
    ],
)
def test_reads_and_predictions_are_not(path: str) -> None:
    assert not is_change("POST", path)
