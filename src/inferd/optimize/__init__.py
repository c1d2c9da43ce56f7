"""``inferd optimize``: smaller or faster variants of a model, each a version folder (``variants``)."""

from inferd.optimize.variants import (
    EXACT_TOLERANCE,
    FP16_TOLERANCE,
    INT8_TOLERANCE,
    RECIPES,
    VARIANT_NAMES,
    OptimizeOptions,
    Variant,
    chosen,
    run,
)

__all__ = [
    "EXACT_TOLERANCE",
    "FP16_TOLERANCE",
    "INT8_TOLERANCE",
    "RECIPES",
    "VARIANT_NAMES",
    "OptimizeOptions",
    "Variant",
    "chosen",
    "run",
]
