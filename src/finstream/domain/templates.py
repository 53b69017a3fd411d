"""Moved to :mod:`finstream.domain.notify.templates`; this address is kept for bench/ only.

bench/ (owned by the lead) imports these names from here; nothing in src/ or
tests/ may (tests/unit/test_layering.py). Delete once bench/ imports from the
new address.
"""

from finstream.domain.notify.templates import Limits, Templates

__all__ = ["Limits", "Templates"]
