"""The quiet zone: where a symbol's next ticks cannot meet any of its conditions.

See :func:`quiet_zone`; :func:`finstream.domain.alerts.engine.evaluate`
computes a zone after a tick that met no condition and lets the ticks inside
it skip the rules.
"""

from __future__ import annotations

from bisect import bisect_right
from decimal import Decimal
from typing import NamedTuple

from finstream.domain.alerts.books import RuleBook
from finstream.domain.alerts.conditions import View

_INFINITY = Decimal("Infinity")
_ONE = Decimal(1)
# Zone bounds are pulled in by this fraction so that no rounding of the
# conditions' own arithmetic (28 significant digits) can decide a tick inside.
_MARGIN = Decimal("1e-9")


class Zone(NamedTuple):
    """Where the next ticks can go without any rule's condition holding.

    A tick of the same evaluation bar (``start``) with a price strictly
    between ``low`` and ``high``, the same previous close and its bar's volume
    below ``volume`` meets no condition of the book the zone was computed for,
    and leaves the zone valid for the ticks after it.
    """

    start: int
    low: Decimal
    high: Decimal
    volume: Decimal


def quiet_zone(book: RuleBook, view: View, band: tuple[int, int] | None) -> Zone | None:
    """The zone around ``view.price`` in which no tick meets a condition of ``book``.

    Called after a full evaluation in which no condition held. Crossing levels
    and band thresholds bound the zone at the nearest ones around the price.
    A moving rule holds when the price is ``percent`` beyond its window's
    extreme before the tick (a tick that makes a new extreme never meets its
    own rule), and a tick inside the zone moves an extreme at most to the
    zone's edge: the zone stays within ``spread`` of the price, which keeps
    every such threshold outside it (``spread`` is half of what the smallest
    percent allows). A window in seconds that loses a bar as time passes only
    moves its extremes toward the price, away from the thresholds. A new bar
    ends the zone.
    """
    price = view.price
    low, high, volume = Decimal(0), _INFINITY, _INFINITY
    levels = book.levels
    if levels:
        k = bisect_right(levels, price)
        if k:
            low = levels[k - 1]
        if k < len(levels):
            high = levels[k]
    if band is not None:
        # A price on a threshold gets high == price below: no zone.
        i = band[0]
        breaks = book.breaks
        if i:
            low = max(low, breaks[i - 1])
        if i < len(breaks):
            high = min(high, breaks[i])
    if book.spread is not None:
        low = max(low, price * (_ONE - book.spread))
        high = min(high, price * (_ONE + book.spread))
        for bars, seconds, fraction in book.moving_up:
            high = min(high, view.window(bars, seconds)[0] * (_ONE + fraction))
        for bars, seconds, fraction in book.moving_down:
            low = max(low, view.window(bars, seconds)[1] * (_ONE - fraction))
    close, change = view.prev_close, book.change_fraction
    if close is not None and change is not None:
        low = max(low, close * (_ONE - change))
        high = min(high, close * (_ONE + change))
    for bars, multiplier in book.spikes:
        total = view.volume_total(bars)
        if total is not None and total > 0:
            volume = min(volume, multiplier * total / bars * (_ONE - _MARGIN))
    low, high = low * (_ONE + _MARGIN), high * (_ONE - _MARGIN)
    if not low < price < high or not view.current.volume < volume:
        return None
    return Zone(view.current.start, low, high, volume)
