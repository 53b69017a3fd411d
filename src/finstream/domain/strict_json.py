"""Strict JSON (RFC 8259) for everything a browser or another client parses.

Python's json module writes ``NaN``, ``Infinity`` and ``-Infinity`` by
default and reads them back, and it reads a number too large for a double
(``1e999``) as infinity. None of that is JSON: JavaScript's ``JSON.parse``
rejects a whole WebSocket frame for one bare ``NaN``. The policy here, used
by every WebSocket frame and every Redis pub/sub payload:

* writers refuse: :func:`dumps` raises :class:`NonFiniteNumber` naming the
  JSON pointers of the offending values, so a producer's bug is an error
  with a place, never a frame nobody can parse;
* relays repair and say so: :func:`parse` reads text written by someone
  else (a Redis channel), and hands back the value with each non-finite
  number replaced by ``null`` plus the pointers of what it replaced, which
  the WebSocket frame carries as ``"nonfinite"``.

Pure: no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any


class NonFiniteNumber(ValueError):
    """A value holds NaN or an infinity, which JSON cannot represent."""

    def __init__(self, pointers: list[str]) -> None:
        self.pointers = pointers
        where = ", ".join(p or "(the whole value)" for p in pointers[:5])
        more = f" and {len(pointers) - 5} more" if len(pointers) > 5 else ""
        super().__init__(f"non-finite number (NaN or Infinity) at {where}{more}")


class _NonFinite:
    """Stands in for a non-finite number while parsing, so it can be found afterwards."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _walk(value: Any, pointer: str, found: list[str], replace: bool) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found.append(pointer)
        return None
    if isinstance(value, _NonFinite):
        found.append(pointer)
        return None
    if isinstance(value, Mapping):
        out = {
            k: _walk(v, f"{pointer}/{_escape(str(k))}", found, replace) for k, v in value.items()
        }
        return out if replace else value
    if isinstance(value, list | tuple):
        items = [_walk(v, f"{pointer}/{i}", found, replace) for i, v in enumerate(value)]
        return items if replace else value
    return value


def non_finite_pointers(value: Any) -> list[str]:
    """JSON pointers (RFC 6901) of every NaN or infinite float in ``value``."""
    found: list[str] = []
    _walk(value, "", found, replace=False)
    return found


def replace_non_finite(value: Any) -> tuple[Any, list[str]]:
    """A copy of ``value`` with every non-finite float as None, and where they were."""
    found: list[str] = []
    return _walk(value, "", found, replace=True), found


def dumps(
    value: Any, *, sort_keys: bool = False, default: Callable[[Any], Any] | None = None
) -> str:
    """Compact strict JSON text; :class:`NonFiniteNumber` when ``value`` holds NaN/Infinity."""
    try:
        return json.dumps(
            value, allow_nan=False, separators=(",", ":"), sort_keys=sort_keys, default=default
        )
    except ValueError:
        pointers = non_finite_pointers(value)
        if not pointers:
            raise
        raise NonFiniteNumber(pointers) from None


def parse(text: str) -> tuple[Any, list[str]]:
    """Read JSON written by someone else: the value, and the pointers of non-finite numbers.

    Each ``NaN``, ``Infinity``, ``-Infinity`` and overflowing number comes back
    as None, and its pointer is listed; an empty list means ``text`` was
    strict JSON already. Text that is not JSON at all raises ``ValueError``.
    """
    seen: list[bool] = []

    def constant(name: str) -> Any:
        seen.append(True)
        return _NonFinite(name)

    def number(literal: str) -> Any:
        result = float(literal)
        if math.isfinite(result):
            return result
        seen.append(True)
        return _NonFinite(literal)

    value = json.loads(text, parse_constant=constant, parse_float=number)
    if not seen:
        return value, []
    return replace_non_finite(value)
