"""The suites drive the API through the same fixtures as tests/api (real signatures, a migrated database)."""

from __future__ import annotations

from tests.api.conftest import client, settings, world

__all__ = ["client", "settings", "world"]
