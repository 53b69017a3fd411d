"""Moved to :mod:`finstream.domain.marketdata.bars`; this address is kept for bench/ only.

bench/ (owned by the lead) imports these names from here; nothing in src/ or
tests/ may (tests/unit/test_layering.py). Delete once bench/ imports from the
new address.
"""

from finstream.domain.marketdata.bars import BarState, add_tick, parse_interval

__all__ = ["BarState", "add_tick", "parse_interval"]
