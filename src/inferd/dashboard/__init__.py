"""The dashboard: a page on the REST port and the JSON routes it reads (routes)."""

from inferd.dashboard.routes import (
    API_PREFIX,
    PREFIX,
    Dashboard,
    is_admin,
    is_public,
)

__all__ = [
    "API_PREFIX",
    "PREFIX",
    "Dashboard",
    "is_admin",
    "is_public",
]
