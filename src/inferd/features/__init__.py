"""Features a request lacks, looked up in an online store at prediction time and joined in.

A model's ``[features]`` table (see ``FeatureSettings``) names the entity input(s) a request
carries, the features to fetch and how they join with the request's own inputs to form the
model's inputs. ``FeatureJoin`` turns a request-side batch into model inputs: it reads the rows
of the batch's distinct entities from an ``EntityCache``, fetches the rest from the
``FeatureStore`` in one round trip under the lookup timeout (merged with the lookups of other
requests that wait at the same time, see ``LookupBatcher``), and assembles the columns.
"""

from __future__ import annotations

from inferd.features.cache import PredictionCache
from inferd.features.join import FeatureJoin, JoinPlan, feature_dtype, parse_row, plan_join
from inferd.features.store import FeatureStore, StoreError
from inferd.features.stores import FeatureStores

__all__ = [
    "FeatureJoin",
    "FeatureStore",
    "FeatureStores",
    "JoinPlan",
    "PredictionCache",
    "StoreError",
    "feature_dtype",
    "parse_row",
    "plan_join",
]
