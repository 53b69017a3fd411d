"""Helpers for the API's tests: now :mod:`finstream.testing.api`, re-exported here."""

from finstream.testing.api import (
    AUDIENCE,
    HS_SECRET,
    ISSUER,
    Keys,
    api_client,
    api_server,
    api_settings,
    auth,
)

__all__ = [
    "AUDIENCE",
    "HS_SECRET",
    "ISSUER",
    "Keys",
    "api_client",
    "api_server",
    "api_settings",
    "auth",
]
