"""Moved to :mod:`finstream.stores.quotes`; this address is kept for bench/ only.

bench/ (owned by the lead) imports these names from here; nothing in src/ or
tests/ may (tests/unit/test_layering.py). Delete once bench/ imports from the
new address.
"""

from finstream.stores.quotes import QuoteCache

__all__ = ["QuoteCache"]
