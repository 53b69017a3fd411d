"""Avro binary writers compiled per schema: the hot path of :meth:`finstream.codec.Codec.encode`.

fastavro's ``schemaless_writer`` walks the parsed schema for every record: its
dict lookups and union resolution cost 250-570 ns a field, about 9 us for an
OutboundMessage (20 fields), and the router encodes three records a request
(bench/RESULTS.md). :func:`compile_writer` turns a record schema into one
Python function that writes exactly what fastavro writes (the tests compare
the bytes for every schema version it compiles, with generated records):
through ``Codec.encode`` an OutboundMessage takes 5.2 us against 12.2.

The compiled writer accepts only values of the exact types it knows
(``str``, ``int`` within 64 bits, ``bool``, ``float``, ``bytes``, ``dict``
records and maps, ``list`` arrays, timezone-aware ``datetime`` for
timestamp-micros, enum symbols); anything else raises, and the caller falls
back to fastavro, which writes it as it always did or raises its error. So a
record's bytes never depend on which path wrote them.

Schemas with a type it does not compile (decimals, fixed, unions of two
non-null types, other logical types, recursive types) get ``None``: fastavro
writes them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

# Zigzag varints of -2048..2047, looked up rather than computed.
_SMALL_MIN = -2048
_SMALL_MAX = 2047
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Unsupported(Exception):
    """The schema has a type this module does not compile."""


class _Fallback(Exception):  # a signal to the caller, not an error
    """The value is not one the compiled writer knows: fastavro writes it."""


def _varint(n: int) -> bytes:
    """Avro's long encoding: zigzag, then 7 bits a byte, low bits first."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z & ~0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_SMALL = tuple(_varint(n) for n in range(_SMALL_MIN, _SMALL_MAX + 1))
_LEN = _SMALL[-_SMALL_MIN:]  # lengths 0..2047


def _utf8(value: Any) -> bytes:
    """A ``str`` subclass (a StrEnum member) as UTF-8; anything else falls back."""
    if not isinstance(value, str):
        raise _Fallback
    return value.encode()


def _long(n: int) -> bytes:
    if _SMALL_MIN <= n <= _SMALL_MAX:
        return _SMALL[n - _SMALL_MIN]
    if not _INT64_MIN <= n <= _INT64_MAX:
        raise OverflowError(f"{n} does not fit a long")
    return _varint(n)


class _Writer:
    """Generates the source of one record schema's writer."""

    PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "string", "bytes"})

    def __init__(self, named: Mapping[str, Any]) -> None:
        self.named = named
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self._n = 0
        self._stack: list[str] = []

    def var(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def const(self, value: Any) -> str:
        name = self.var("_c")
        self.consts[name] = value
        return name

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def resolve(self, schema: Any) -> Any:
        if isinstance(schema, str) and schema not in self.PRIMITIVES:
            if schema not in self.named:
                raise _Unsupported(f"unknown named type {schema}")
            return self.named[schema]
        return schema

    def write(self, schema: Any, value: str, depth: int) -> None:
        """Lines that write ``value`` (a local name) as ``schema``, or raise (fall back)."""
        schema = self.resolve(schema)
        if isinstance(schema, list):
            self.union(schema, value, depth)
            return
        if isinstance(schema, dict):
            kind = schema["type"]
            logical = schema.get("logicalType")
            if logical is not None:
                if logical == "timestamp-micros" and kind == "long":
                    self.timestamp_micros(value, depth)
                    return
                raise _Unsupported(f"logical type {logical}")
            if kind == "record":
                self.record(schema, value, depth)
            elif kind == "enum":
                self.enum(schema, value, depth)
            elif kind == "array":
                self.array(schema, value, depth)
            elif kind == "map":
                self.map(schema, value, depth)
            elif kind in self.PRIMITIVES:
                self.write(kind, value, depth)
            else:
                raise _Unsupported(f"type {kind}")
            return
        self.primitive(schema, value, depth)

    def primitive(self, kind: str, v: str, d: int) -> None:
        if kind == "null":
            self.emit(d, f"if {v} is not None: raise _Fallback")
        elif kind == "boolean":
            self.emit(d, f"if {v} is True: a(b'\\x01')")
            self.emit(d, f"elif {v} is False: a(b'\\x00')")
            self.emit(d, "else: raise _Fallback")
        elif kind in ("int", "long"):
            self.emit(d, f"if type({v}) is not int: raise _Fallback")
            self.emit(d, f"a(_long({v}))")
        elif kind in ("float", "double"):
            pack = "_pack_f" if kind == "float" else "_pack_d"
            self.emit(d, f"if type({v}) is not float and type({v}) is not int: raise _Fallback")
            self.emit(d, f"a({pack}({v}))")
        elif kind == "string":
            b, n = self.var("b"), self.var("n")
            self.emit(d, f"{b} = {v}.encode() if type({v}) is str else _utf8({v})")
            # Lengths up to 2047 (nearly every string) from the table, not a call.
            self.emit(d, f"{n} = len({b})")
            self.emit(d, f"a(_LEN[{n}] if {n} < 2048 else _long({n}))")
            self.emit(d, f"a({b})")
        elif kind == "bytes":
            self.emit(d, f"if type({v}) is not bytes: raise _Fallback")
            self.emit(d, f"a(_long(len({v})))")
            self.emit(d, f"a({v})")
        else:
            raise _Unsupported(f"type {kind}")

    def timestamp_micros(self, v: str, d: int) -> None:
        x = self.var("t")
        self.emit(d, f"if type({v}) is int: {x} = {v}")
        self.emit(d, f"elif type({v}) is datetime and {v}.tzinfo is not None:")
        # The exact integer arithmetic fastavro uses for an aware datetime.
        self.emit(d + 1, f"{x} = {v} - _EPOCH")
        self.emit(d + 1, f"{x} = ({x}.days * 86400 + {x}.seconds) * 1000000 + {x}.microseconds")
        self.emit(d, "else: raise _Fallback")
        self.emit(d, f"a(_long({x}))")

    def union(self, branches: list[Any], v: str, d: int) -> None:
        kinds = [self.resolve(b) for b in branches]
        nulls = [i for i, b in enumerate(kinds) if b in ("null", {"type": "null"})]
        if len(branches) != 2 or len(nulls) != 1:
            raise _Unsupported("a union other than null and one type")
        null = nulls[0]
        other = 1 - null
        self.emit(d, f"if {v} is None: a({_long(null)!r})")
        self.emit(d, "else:")
        self.emit(d + 1, f"a({_long(other)!r})")
        self.write(branches[other], v, d + 1)

    def enum(self, schema: Mapping[str, Any], v: str, d: int) -> None:
        codes = self.const({s: _long(i) for i, s in enumerate(schema["symbols"])})
        x = self.var("e")
        self.emit(d, f"{x} = {codes}.get({v}) if isinstance({v}, str) else None")
        self.emit(d, f"if {x} is None: raise _Fallback")
        self.emit(d, f"a({x})")

    def array(self, schema: Mapping[str, Any], v: str, d: int) -> None:
        item = self.var("i")
        self.emit(d, f"if type({v}) is not list: raise _Fallback")
        self.emit(d, f"if {v}:")
        self.emit(d + 1, f"a(_long(len({v})))")
        self.emit(d + 1, f"for {item} in {v}:")
        self.write(schema["items"], item, d + 2)
        self.emit(d, "a(b'\\x00')")

    def map(self, schema: Mapping[str, Any], v: str, d: int) -> None:
        key, val = self.var("k"), self.var("m")
        self.emit(d, f"if type({v}) is not dict: raise _Fallback")
        self.emit(d, f"if {v}:")
        self.emit(d + 1, f"a(_long(len({v})))")
        self.emit(d + 1, f"for {key}, {val} in {v}.items():")
        self.primitive("string", key, d + 2)
        self.write(schema["values"], val, d + 2)
        self.emit(d, "a(b'\\x00')")

    def record(self, schema: Mapping[str, Any], v: str, d: int) -> None:
        name = schema["name"]
        if name in self._stack:
            raise _Unsupported(f"recursive type {name}")
        self._stack.append(name)
        self.emit(d, f"if type({v}) is not dict: raise _Fallback")
        for field in schema["fields"]:
            x = self.var("f")
            # A missing field raises KeyError: fastavro writes its default.
            self.emit(d, f"{x} = {v}[{field['name']!r}]")
            self.write(field["type"], x, d)
        self._stack.pop()


def compile_writer(parsed: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], bytes] | None:
    """A writer for records of ``parsed`` (a fastavro-parsed record schema), or None.

    The writer raises (any exception) for a value it does not take; the
    caller then writes the record with fastavro.
    """
    if not isinstance(parsed, Mapping) or parsed.get("type") != "record":
        return None
    gen = _Writer(parsed.get("__named_schemas") or {})
    try:
        gen.record(parsed, "r", 1)
    except _Unsupported:
        return None
    source = "\n".join(["def write(r):", "    p = []", "    a = p.append", *gen.lines])
    source += "\n    return b''.join(p)\n"
    namespace: dict[str, Any] = {
        "_long": _long,
        "_LEN": _LEN,
        "_utf8": _utf8,
        "_Fallback": _Fallback,
        "_EPOCH": _EPOCH,
        "datetime": datetime,
        "_pack_d": struct.Struct("<d").pack,
        "_pack_f": struct.Struct("<f").pack,
        **gen.consts,
    }
    exec(compile(source, f"<avro writer {parsed['name']}>", "exec"), namespace)  # noqa: S102
    writer: Callable[[Mapping[str, Any]], bytes] = namespace["write"]
    return writer
