"""Moved to :mod:`finstream.domain.notify.routing`; this address is kept for bench/ only.

bench/ (owned by the lead) imports these names from here; nothing in src/ or
tests/ may (tests/unit/test_layering.py). Delete once bench/ imports from the
new address.
"""

from finstream.domain.notify.routing import (
    Action,
    Hold,
    Holds,
    Policy,
    UserState,
    audit_event,
    compose,
    decide,
    remember,
)

__all__ = [
    "Action",
    "Hold",
    "Holds",
    "Policy",
    "UserState",
    "audit_event",
    "compose",
    "decide",
    "remember",
]
