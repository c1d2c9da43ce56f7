"""``inferd select``: measure candidate models and pick the best that fits budgets (``selection``)."""

from inferd.select.selection import (
    Result,
    Selection,
    SelectOptions,
    prepare,
    run,
)

__all__ = [
    "Result",
    "SelectOptions",
    "Selection",
    "prepare",
    "run",
]
