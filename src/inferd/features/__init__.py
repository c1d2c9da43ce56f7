"""Features a request lacks, looked up in an online store at prediction time and joined in.

A model's ``[features]`` table (see ``FeatureSettings``) names the entity input(s) a request
carries, the features to fetch and how they join with the request's own inputs to form the
model's inputs. ``FeatureJoin`` turns a request-side batch into model inputs: it reads the rows
of the batch's distinct entities from an ``EntityCache``, fetches the rest from the
``FeatureStore`` in one round trip under the lookup timeout (merged with the lookups of other
requests that wait at the same time, see ``LookupBatcher``), and assembles the columns.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from inferd.config import ModelSettings
from inferd.errors import ModelLoadError
from inferd.features.cache import PredictionCache
from inferd.features.join import FeatureJoin, JoinPlan, feature_dtype, parse_row, plan_join
from inferd.features.store import FeatureStore, StoreError
from inferd.features.stores import FeatureStores
from inferd.runtimes import Model, load_model

__all__ = [
    "FeatureJoin",
    "FeatureStore",
    "FeatureStores",
    "JoinPlan",
    "PredictionCache",
    "StoreError",
    "feature_dtype",
    "load_with_features",
    "parse_row",
    "plan_join",
]


def load_with_features(version_dir: Path, settings: ModelSettings, platform: str | None) -> tuple[Model, str]:
    """``load_model``, then check the model's ``[features]`` against its signatures (and that
    redis-py is installed for a Redis store), so that a mismatch fails the version's load instead
    of its requests."""
    features = settings.features
    if features is not None and "://" in features.store and importlib.util.find_spec("redis") is None:
        raise ModelLoadError("[features] a Redis store needs redis-py: pip install 'inferd[redis]'")
    model, runtime = load_model(version_dir, settings, platform)
    if features is not None:
        try:
            plan_join(features, model.signatures)
        except ModelLoadError:
            model.close()
            raise
    return model, runtime
