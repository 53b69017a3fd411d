"""Alert rules: their model, their validation and their Avro record form.

A rule says *what* to watch (a condition on one symbol's price or volume),
*how often* to tell the user (a frequency) and *until when* (an expiry).
:func:`parse_rule` turns user input (CLI, API, a rules file) into a valid
:class:`AlertRule` or raises :class:`RuleValidationError` naming the field;
:func:`validate_rule` re-checks a rule read from the ``alerts.rules`` topic,
where anyone with write access could have put anything.

Conditions (``value``, ``lower``/``upper``, ``percent``, ``bars``,
``window_seconds`` and ``multiplier`` are the parameters):

========================== ===============================================
CROSSING / _UP / _DOWN     price moves across ``value``. The level belongs
                           to the upper side: reaching ``value`` from below
                           is a crossing up; going below it from at-or-above
                           is a crossing down. Each side change fires once.
GREATER_THAN / LESS_THAN   price > ``value`` / price < ``value``.
ENTERING / EXITING_CHANNEL price moves into / out of [``lower``, ``upper``].
INSIDE / OUTSIDE_CHANNEL   price is inside / outside [``lower``, ``upper``].
MOVING_UP/DOWN_PERCENT     price is ``percent`` above the lowest (below the
                           highest) price within ``bars`` bars (the forming
                           bar included) or within ``window_seconds``.
CHANGE_FROM_PREV_CLOSE_%   |price / previous close - 1| >= ``percent``.
VOLUME_SPIKE               the forming bar's volume >= ``multiplier`` x the
                           average volume of the ``bars`` completed bars
                           before it.
========================== ===============================================

Evaluation lives in :mod:`finstream.domain.alerts.engine`, shared by the live
alerts agent and back-testing.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from finstream.domain.marketdata.ticks import TickValidationError, normalize_symbol, to_decimal

CONDITIONS = (
    "CROSSING",
    "CROSSING_UP",
    "CROSSING_DOWN",
    "GREATER_THAN",
    "LESS_THAN",
    "ENTERING_CHANNEL",
    "EXITING_CHANNEL",
    "INSIDE_CHANNEL",
    "OUTSIDE_CHANNEL",
    "MOVING_UP_PERCENT",
    "MOVING_DOWN_PERCENT",
    "CHANGE_FROM_PREV_CLOSE_PERCENT",
    "VOLUME_SPIKE",
)
FREQUENCIES = ("ONLY_ONCE", "ONCE_PER_BAR", "ONCE_PER_BAR_CLOSE", "ONCE_PER_MINUTE", "EVERY_TIME")

LEVEL_CONDITIONS = frozenset(
    {"CROSSING", "CROSSING_UP", "CROSSING_DOWN", "GREATER_THAN", "LESS_THAN"}
)
CHANNEL_CONDITIONS = frozenset(
    {"ENTERING_CHANNEL", "EXITING_CHANNEL", "INSIDE_CHANNEL", "OUTSIDE_CHANNEL"}
)
MOVING_CONDITIONS = frozenset({"MOVING_UP_PERCENT", "MOVING_DOWN_PERCENT"})
# Conditions about a move from one observation to the next: they need the
# previous price (or bar close) and fire on the change, not on a state.
EDGE_CONDITIONS = frozenset(
    {"CROSSING", "CROSSING_UP", "CROSSING_DOWN", "ENTERING_CHANNEL", "EXITING_CHANNEL"}
)

# Parameters each condition takes; anything else given is refused, because a
# stray parameter usually means the user picked the wrong condition.
_PARAMS: dict[str, frozenset[str]] = {
    **{c: frozenset({"value"}) for c in LEVEL_CONDITIONS},
    **{c: frozenset({"lower", "upper"}) for c in CHANNEL_CONDITIONS},
    **{c: frozenset({"percent", "bars", "window_seconds"}) for c in MOVING_CONDITIONS},
    "CHANGE_FROM_PREV_CLOSE_PERCENT": frozenset({"percent"}),
    "VOLUME_SPIKE": frozenset({"bars", "multiplier"}),
}
ALL_PARAMS = ("value", "lower", "upper", "percent", "bars", "window_seconds", "multiplier")

MAX_WINDOW_BARS = 500
MAX_WINDOW_SECONDS = 86_400
MAX_COOLDOWN_SECONDS = 30 * 86_400
MAX_PERCENT = Decimal(10_000)
MAX_MESSAGE_CHARS = 500
MAX_ID_CHARS = 128
_RULE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")
_FIELDS = frozenset(
    {
        "rule_id",
        "user_id",
        "symbol",
        "condition",
        *ALL_PARAMS,
        "frequency",
        "cooldown_seconds",
        "expires_at",
        "enabled",
        "message",
        "created_at",
        "updated_at",
    }
)


class RuleValidationError(ValueError):
    """A rule that cannot be accepted. ``field`` names the culprit; ``message`` says why.

    ``message`` starts with the field's name, so it reads well on its own
    (``lower: must be below upper (lower=10, upper=5)``).
    """

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        self.message = f"{field}: {detail}"
        super().__init__(self.message)


@dataclass(frozen=True, slots=True)
class AlertRule:
    rule_id: str
    user_id: str
    symbol: str
    condition: str
    created_at: datetime
    updated_at: datetime
    frequency: str = "ONLY_ONCE"
    value: Decimal | None = None
    lower: Decimal | None = None
    upper: Decimal | None = None
    percent: Decimal | None = None
    bars: int | None = None
    window_seconds: int | None = None
    multiplier: Decimal | None = None
    cooldown_seconds: int | None = None
    expires_at: datetime | None = None
    enabled: bool = True
    message: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The AlertRule Avro record (schemas/AlertRule.avsc)."""
        return {
            "rule_id": self.rule_id,
            "user_id": self.user_id,
            "symbol": self.symbol,
            "condition": self.condition,
            "value": self.value,
            "lower": self.lower,
            "upper": self.upper,
            "percent": self.percent,
            "bars": self.bars,
            "window_seconds": self.window_seconds,
            "multiplier": self.multiplier,
            "frequency": self.frequency,
            "cooldown_seconds": self.cooldown_seconds,
            "expires_at": self.expires_at,
            "enabled": self.enabled,
            "message": self.message,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AlertRule:
        """The rule held by a decoded AlertRule record (no validation: see validate_rule)."""
        return cls(
            rule_id=record["rule_id"],
            user_id=record["user_id"],
            symbol=record["symbol"],
            condition=record["condition"],
            value=record.get("value"),
            lower=record.get("lower"),
            upper=record.get("upper"),
            percent=record.get("percent"),
            bars=record.get("bars"),
            window_seconds=record.get("window_seconds"),
            multiplier=record.get("multiplier"),
            frequency=record.get("frequency") or "ONLY_ONCE",
            cooldown_seconds=record.get("cooldown_seconds"),
            expires_at=record.get("expires_at"),
            enabled=bool(record.get("enabled", True)),
            message=record.get("message"),
            created_at=record["created_at"],
            updated_at=record["updated_at"],
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly form: decimals as strings, times in ISO 8601, nulls left out."""
        out: dict[str, Any] = {}
        for key, val in self.to_record().items():
            if val is None:
                continue
            if isinstance(val, Decimal):
                out[key] = f"{val.normalize():f}"
            elif isinstance(val, datetime):
                out[key] = val.isoformat()
            else:
                out[key] = val
        return out

    def describe(self) -> str:
        """One human line: 'AAPL crossing up 190', 'TSLA moving down 5% within 3 bars'."""
        c = self.condition
        name = c.lower().replace("_percent", "").replace("_", " ")
        if c in LEVEL_CONDITIONS:
            what = f"{name} {_num(self.value)}"
        elif c in CHANNEL_CONDITIONS:
            what = f"{name} {_num(self.lower)}-{_num(self.upper)}"
        elif c in MOVING_CONDITIONS:
            span = (
                f"{self.bars} bar{'s' if self.bars != 1 else ''}"
                if self.bars is not None
                else f"{self.window_seconds}s"
            )
            what = f"{name} {_num(self.percent)}% within {span}"
        elif c == "CHANGE_FROM_PREV_CLOSE_PERCENT":
            what = f"change from previous close {_num(self.percent)}%"
        else:
            what = f"volume spike {_num(self.multiplier)}x the {self.bars}-bar average"
        return f"{self.symbol} {what}"


def _num(value: Decimal | None) -> str:
    return "?" if value is None else f"{value.normalize():f}"


# -- parsing ---------------------------------------------------------------------


def _text(data: Mapping[str, Any], field: str, *, required: bool) -> str | None:
    value = data.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RuleValidationError(field, "is required")
        return None
    if not isinstance(value, str):
        raise RuleValidationError(field, f"must be text, got {type(value).__name__}")
    return value.strip()


def _choice(
    data: Mapping[str, Any], field: str, allowed: tuple[str, ...], default: str | None
) -> str:
    raw = data.get(field)
    if raw is None or raw == "":
        if default is None:
            raise RuleValidationError(field, f"is required (one of {', '.join(allowed)})")
        return default
    if not isinstance(raw, str):
        raise RuleValidationError(field, f"must be text, got {type(raw).__name__}")
    value = raw.strip().upper().replace("-", "_").replace(" ", "_")
    if value not in allowed:
        raise RuleValidationError(field, f"{raw!r} is not one of {', '.join(allowed)}")
    return value


def _decimal(data: Mapping[str, Any], field: str) -> Decimal | None:
    raw = data.get(field)
    if raw is None or raw == "":
        return None
    try:
        value = to_decimal(raw, field)
    except TickValidationError as exc:
        raise RuleValidationError(field, exc.detail) from None
    return value


def _integer(data: Mapping[str, Any], field: str) -> int | None:
    raw = data.get(field)
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):
        raise RuleValidationError(field, f"must be a whole number, got {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d{1,18}\s*", raw):
        return int(raw)
    if isinstance(raw, float | Decimal) and raw == int(raw):
        return int(raw)
    raise RuleValidationError(field, f"must be a whole number, got {raw!r}")


def _time(data: Mapping[str, Any], field: str) -> datetime | None:
    raw = data.get(field)
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            raw = datetime.fromisoformat(text)
        except ValueError:
            raise RuleValidationError(field, f"{raw!r} is not an ISO 8601 time") from None
    if not isinstance(raw, datetime):
        raise RuleValidationError(field, f"must be a time, got {type(raw).__name__}")
    if raw.tzinfo is None:
        raise RuleValidationError(field, "needs a time zone (e.g. 2025-01-31T16:00:00Z)")
    return raw


def _positive(field: str, value: Decimal | None, *, required: bool = True) -> None:
    if value is None:
        if required:
            raise RuleValidationError(field, "is required for this condition")
        return
    if value <= 0:
        raise RuleValidationError(field, f"must be positive, got {value.normalize():f}")


def parse_rule(data: Mapping[str, Any], *, now: datetime) -> AlertRule:
    """A valid rule from user input, or RuleValidationError naming the field.

    Accepts what a person or a JSON body would send: condition and frequency
    names in any case (``crossing-up`` works), numbers as strings or numbers,
    times as ISO 8601 text with a zone. ``rule_id`` is generated when absent;
    ``created_at``/``updated_at`` default to ``now``. An expiry must lie after
    ``now``.
    """
    if not isinstance(data, Mapping):
        raise RuleValidationError("rule", f"must be an object, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _FIELDS)
    if unknown:
        raise RuleValidationError(unknown[0], "is not a field of an alert rule")
    rule_id = _text(data, "rule_id", required=False) or f"r-{uuid.uuid4().hex}"
    user_id = _text(data, "user_id", required=True)
    raw_symbol = data.get("symbol")
    if raw_symbol is None or raw_symbol == "":
        raise RuleValidationError("symbol", "is required")
    try:
        symbol = normalize_symbol(raw_symbol)
    except TickValidationError as exc:
        raise RuleValidationError("symbol", exc.detail) from None
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RuleValidationError("enabled", f"must be true or false, got {enabled!r}")
    assert user_id is not None
    rule = AlertRule(
        rule_id=rule_id,
        user_id=user_id,
        symbol=symbol,
        condition=_choice(data, "condition", CONDITIONS, None),
        value=_decimal(data, "value"),
        lower=_decimal(data, "lower"),
        upper=_decimal(data, "upper"),
        percent=_decimal(data, "percent"),
        bars=_integer(data, "bars"),
        window_seconds=_integer(data, "window_seconds"),
        multiplier=_decimal(data, "multiplier"),
        frequency=_choice(data, "frequency", FREQUENCIES, "ONLY_ONCE"),
        cooldown_seconds=_integer(data, "cooldown_seconds"),
        expires_at=_time(data, "expires_at"),
        enabled=enabled,
        message=_text(data, "message", required=False),
        created_at=_time(data, "created_at") or now,
        updated_at=_time(data, "updated_at") or now,
    )
    validate_rule(rule)
    if rule.expires_at is not None and rule.expires_at <= now:
        raise RuleValidationError(
            "expires_at", f"must be in the future (got {rule.expires_at.isoformat()})"
        )
    return rule


def validate_rule(rule: AlertRule) -> AlertRule:
    """Every check that does not depend on the clock; raises RuleValidationError."""
    if not rule.rule_id or len(rule.rule_id) > MAX_ID_CHARS or not _RULE_ID_RE.match(rule.rule_id):
        raise RuleValidationError(
            "rule_id",
            f"must be 1-{MAX_ID_CHARS} letters, digits or ._:@- starting with a letter or digit",
        )
    if not rule.user_id or len(rule.user_id) > MAX_ID_CHARS:
        raise RuleValidationError("user_id", f"must be 1-{MAX_ID_CHARS} characters")
    if any(ord(ch) < 32 for ch in rule.user_id):
        raise RuleValidationError("user_id", "must not contain control characters")
    try:
        if normalize_symbol(rule.symbol) != rule.symbol:
            raise RuleValidationError("symbol", f"{rule.symbol!r} is not upper case")
    except TickValidationError as exc:
        raise RuleValidationError("symbol", exc.detail) from None
    if rule.condition not in CONDITIONS:
        raise RuleValidationError("condition", f"{rule.condition!r} is not a known condition")
    if rule.frequency not in FREQUENCIES:
        raise RuleValidationError("frequency", f"{rule.frequency!r} is not a known frequency")
    allowed = _PARAMS[rule.condition]
    for param in ALL_PARAMS:
        if getattr(rule, param) is not None and param not in allowed:
            raise RuleValidationError(
                param,
                f"is not a parameter of {rule.condition} (it takes {', '.join(sorted(allowed))})",
            )
    _validate_parameters(rule)
    if rule.cooldown_seconds is not None:
        if rule.frequency != "EVERY_TIME":
            raise RuleValidationError(
                "cooldown_seconds", f"only applies to frequency EVERY_TIME, not {rule.frequency}"
            )
        if not 0 <= rule.cooldown_seconds <= MAX_COOLDOWN_SECONDS:
            raise RuleValidationError(
                "cooldown_seconds", f"must be between 0 and {MAX_COOLDOWN_SECONDS}"
            )
    if rule.message is not None and len(rule.message) > MAX_MESSAGE_CHARS:
        raise RuleValidationError("message", f"must be at most {MAX_MESSAGE_CHARS} characters")
    for name in ("created_at", "updated_at", "expires_at"):
        value = getattr(rule, name)
        if value is not None and value.tzinfo is None:
            raise RuleValidationError(name, "needs a time zone")
    if rule.updated_at < rule.created_at:
        raise RuleValidationError("updated_at", "must not be before created_at")
    return rule


def _validate_parameters(rule: AlertRule) -> None:
    c = rule.condition
    if c in LEVEL_CONDITIONS:
        _positive("value", rule.value)
    elif c in CHANNEL_CONDITIONS:
        _positive("lower", rule.lower)
        _positive("upper", rule.upper)
        assert rule.lower is not None
        assert rule.upper is not None
        if rule.lower >= rule.upper:
            raise RuleValidationError(
                "lower",
                f"must be below upper (lower={rule.lower.normalize():f}, "
                f"upper={rule.upper.normalize():f})",
            )
    elif c in MOVING_CONDITIONS:
        _positive("percent", rule.percent)
        assert rule.percent is not None
        limit = Decimal(100) if c == "MOVING_DOWN_PERCENT" else MAX_PERCENT
        if rule.percent >= limit:
            raise RuleValidationError("percent", f"must be below {limit} for {c}")
        if (rule.bars is None) == (rule.window_seconds is None):
            raise RuleValidationError(
                "bars", "give exactly one of bars or window_seconds for the window"
            )
        _window(rule)
    elif c == "CHANGE_FROM_PREV_CLOSE_PERCENT":
        _positive("percent", rule.percent)
        assert rule.percent is not None
        if rule.percent >= MAX_PERCENT:
            raise RuleValidationError("percent", f"must be below {MAX_PERCENT}")
    elif c == "VOLUME_SPIKE":
        if rule.bars is None:
            raise RuleValidationError("bars", "is required for VOLUME_SPIKE")
        _window(rule)
        _positive("multiplier", rule.multiplier)
        assert rule.multiplier is not None
        if rule.multiplier <= 1:
            raise RuleValidationError(
                "multiplier", f"must be above 1 to be a spike, got {rule.multiplier.normalize():f}"
            )


def _window(rule: AlertRule) -> None:
    if rule.bars is not None and not 1 <= rule.bars <= MAX_WINDOW_BARS:
        raise RuleValidationError("bars", f"must be between 1 and {MAX_WINDOW_BARS}")
    if rule.window_seconds is not None and not 1 <= rule.window_seconds <= MAX_WINDOW_SECONDS:
        raise RuleValidationError("window_seconds", f"must be between 1 and {MAX_WINDOW_SECONDS}")


def with_updates(rule: AlertRule, *, now: datetime, **changes: Any) -> AlertRule:
    """A changed copy with a fresh updated_at (enable/disable, edits)."""
    updated = replace(
        rule, **changes, updated_at=max(now, rule.updated_at + timedelta(microseconds=1))
    )
    return validate_rule(updated)
