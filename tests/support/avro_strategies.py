"""Hypothesis strategies that generate valid records for any Avro schema."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

_MIN_TS = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TS = datetime(2200, 1, 1)


def _decimal(precision: int, scale: int) -> st.SearchStrategy[Decimal]:
    bound = 10 ** (precision - scale) - 1
    return st.decimals(
        min_value=-bound, max_value=bound, allow_nan=False, allow_infinity=False, places=scale
    ).map(lambda d: d.quantize(Decimal(1).scaleb(-scale)))


def strategy(schema: Any, named: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    named = {} if named is None else named
    if isinstance(schema, str):
        if schema in named:
            return strategy(named[schema], named)
        return {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(-(2**31), 2**31 - 1),
            "long": st.integers(-(2**63), 2**63 - 1),
            "float": st.floats(width=32, allow_nan=False),
            "double": st.floats(allow_nan=False),
            "string": st.text(max_size=20),
            "bytes": st.binary(max_size=20),
        }[schema]
    if isinstance(schema, list):
        return st.one_of([strategy(s, named) for s in schema])
    kind = schema["type"]
    logical = schema.get("logicalType")
    if logical == "decimal":
        return _decimal(schema["precision"], schema.get("scale", 0))
    if logical in ("timestamp-micros", "timestamp-millis"):
        ts = st.datetimes(min_value=datetime(1970, 1, 2), max_value=_MAX_TS, timezones=st.just(UTC))
        if logical == "timestamp-millis":
            ts = ts.map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
        return ts
    if kind == "record":
        full = (
            schema.get("namespace", "") + "." + schema["name"]
            if schema.get("namespace")
            else schema["name"]
        )
        named[schema["name"]] = schema
        named[full] = schema
        fields = {f["name"]: strategy(f["type"], named) for f in schema["fields"]}
        return st.fixed_dictionaries(fields)
    if kind == "enum":
        named[schema["name"]] = schema
        return st.sampled_from(schema["symbols"])
    if kind == "array":
        return st.lists(strategy(schema["items"], named), max_size=4)
    if kind == "map":
        return st.dictionaries(st.text(max_size=8), strategy(schema["values"], named), max_size=4)
    if kind == "fixed":
        return st.binary(min_size=schema["size"], max_size=schema["size"])
    return strategy(kind, named)
