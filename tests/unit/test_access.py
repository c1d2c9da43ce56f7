"""Bearer tokens are compared with ``hmac.compare_digest`` (constant time), never with ``==``."""

from __future__ import annotations

import hmac

import pytest

from inferd.errors import PermissionDenied, Unauthenticated
from inferd.protocols import access
from inferd.protocols.access import Access


def test_every_token_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    constant_time = hmac.compare_digest

    def recording(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return constant_time(given, expected)

    monkeypatch.setattr(access.hmac, "compare_digest", recording)
    tokens = Access(api_token="api-token", admin_token="admin-token")
    tokens.check("Bearer api-token", admin=False)
    tokens.check("Bearer admin-token", admin=True)
    with pytest.raises(Unauthenticated):
        tokens.check("Bearer guess", admin=False)
    with pytest.raises(PermissionDenied):
        tokens.check("Bearer api-token", admin=True)
    assert (b"api-token", b"api-token") in compared
    assert (b"admin-token", b"admin-token") in compared
    assert (b"guess", b"api-token") in compared
    assert (b"guess", b"admin-token") in compared
