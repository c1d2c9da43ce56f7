"""Who may call what: bearer tokens for the API and for admin calls (HTTP and gRPC alike)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from inferd.errors import PermissionDenied, Unauthenticated


@dataclass(frozen=True, slots=True)
class Access:
    """Who may call what. With ``api_token`` set every call needs a bearer token; admin calls
    (load, unload, reload config) need ``admin_token``, and are refused when it is unset. The
    admin token also opens every other call. Empty strings mean unset."""

    api_token: str = ""
    admin_token: str = ""

    def check(self, authorization: str | None, admin: bool) -> None:
        """Check an ``Authorization`` header (``Bearer <token>``) for a call.

        Raises:
            PermissionDenied: admin calls are disabled, or the API token was used for one.
            Unauthenticated: the token is missing or matches none.
        """
        if admin and not self.admin_token:
            raise PermissionDenied(
                "admin operations are disabled; start inferd with --admin_token (or INFERD_ADMIN_TOKEN)"
            )
        if not admin and not self.api_token:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("this call needs an 'Authorization: Bearer <token>' header")
        token = token.strip()
        if _same(token, self.admin_token) or (not admin and _same(token, self.api_token)):
            return
        if admin and _same(token, self.api_token):
            raise PermissionDenied("the API token does not allow admin operations; use the admin token")
        raise Unauthenticated("the bearer token is not valid")


def _same(given: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())
