"""Request and response bodies: the shapes the OpenAPI document publishes.

Pydantic checks types and shapes (and names the offending field when they are
wrong); the domain parsers (:func:`finstream.domain.alerts.rules.parse_rule`,
:func:`finstream.domain.notify.preferences.parse_preferences`) then check meaning,
so the rules live in one place for the API, the CLI and the topic readers.
Decimals travel as strings: a JSON number goes through a binary float on the
way in, so send ``"189.12"`` where every digit matters.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from finstream.api.auth import USER_ID_PATTERN
from finstream.domain.alerts.rules import (
    CONDITIONS,
    FREQUENCIES,
    MAX_COOLDOWN_SECONDS,
    MAX_MESSAGE_CHARS,
    MAX_WINDOW_BARS,
    MAX_WINDOW_SECONDS,
)
from finstream.domain.notify.preferences import (
    CHANNELS,
    MAX_CAP_LIMIT,
    MAX_CAP_WINDOW_SECONDS,
    MAX_CAPS,
    MAX_CATEGORIES,
    MAX_CONSENTS,
    MAX_EMAILS,
    MAX_PHONES,
    MAX_PUSH_TOKENS,
    MAX_QUIET_WINDOWS,
    PUSH_PLATFORMS,
)
from finstream.domain.notify.request import PRIORITIES

if TYPE_CHECKING:
    Condition = str
    Frequency = str
    Channel = str
    RequestChannel = str
    PushPlatform = str
    Priority = str
else:
    # The enumerations come from the domain, in its order, so that the
    # OpenAPI document lists exactly what the domain accepts.
    Condition = Literal[CONDITIONS]
    Frequency = Literal[FREQUENCIES]
    Channel = Literal[CHANNELS]  # preferences name channels in lower case
    RequestChannel = Literal[tuple(c.upper() for c in CHANNELS)]  # requests in upper case
    PushPlatform = Literal[PUSH_PLATFORMS]
    Priority = Literal[PRIORITIES]

DecimalIn = Annotated[Decimal, Field(allow_inf_nan=False)]
DecimalText = Annotated[str, Field(pattern=r"^-?\d+(\.\d+)?$", examples=["189.12"])]
UserId = Annotated[str, Field(pattern=USER_ID_PATTERN)]
Symbol = Annotated[str, Field(pattern=r"^[A-Za-z0-9^][A-Za-z0-9.\-=^/:_]{0,31}$")]
Slug = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- market data --------------------------------------------------------------------


class Quote(_Out):
    symbol: str
    price: DecimalText
    ts: datetime
    kind: str
    source: str
    tick_id: str
    size: DecimalText | None = None
    bid: DecimalText | None = None
    ask: DecimalText | None = None
    prev_close: DecimalText | None = None
    currency: str | None = None


class Bar(_Out):
    symbol: str
    interval: str
    start: datetime
    end: datetime
    open: DecimalText
    high: DecimalText
    low: DecimalText
    close: DecimalText
    volume: DecimalText
    vwap: DecimalText | None = None
    trades: int
    final: bool
    revision: int


class BarPage(_Out):
    items: list[Bar]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


# -- alert rules ----------------------------------------------------------------------


class RuleFields(_In):
    symbol: Symbol
    condition: Condition
    value: DecimalIn | None = None
    lower: DecimalIn | None = None
    upper: DecimalIn | None = None
    percent: DecimalIn | None = None
    bars: Annotated[int, Field(ge=1, le=MAX_WINDOW_BARS)] | None = None
    window_seconds: Annotated[int, Field(ge=1, le=MAX_WINDOW_SECONDS)] | None = None
    multiplier: DecimalIn | None = None
    frequency: Frequency = "ONLY_ONCE"
    cooldown_seconds: Annotated[int, Field(ge=0, le=MAX_COOLDOWN_SECONDS)] | None = None
    expires_at: AwareDatetime | None = None
    enabled: bool = True
    message: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | None = None


class RulePatch(_In):
    """JSON merge patch (RFC 7396) of a rule: given fields replace, null removes."""

    symbol: Symbol | None = None
    condition: Condition | None = None
    value: DecimalIn | None = None
    lower: DecimalIn | None = None
    upper: DecimalIn | None = None
    percent: DecimalIn | None = None
    bars: Annotated[int, Field(ge=1, le=MAX_WINDOW_BARS)] | None = None
    window_seconds: Annotated[int, Field(ge=1, le=MAX_WINDOW_SECONDS)] | None = None
    multiplier: DecimalIn | None = None
    frequency: Frequency | None = None
    cooldown_seconds: Annotated[int, Field(ge=0, le=MAX_COOLDOWN_SECONDS)] | None = None
    expires_at: AwareDatetime | None = None
    enabled: bool | None = None
    message: Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)] | None = None


class Rule(_Out):
    rule_id: str
    user_id: str
    symbol: str
    condition: Condition
    value: DecimalText | None = None
    lower: DecimalText | None = None
    upper: DecimalText | None = None
    percent: DecimalText | None = None
    bars: int | None = None
    window_seconds: int | None = None
    multiplier: DecimalText | None = None
    frequency: Frequency
    cooldown_seconds: int | None = None
    expires_at: datetime | None = None
    enabled: bool
    message: str | None = None
    created_at: datetime
    updated_at: datetime


class RuleList(_Out):
    items: list[Rule]


# -- preferences -------------------------------------------------------------------


ContactId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{2,39}$")]


class EmailContact(_In):
    address: Annotated[str, Field(max_length=254)]
    verified: bool = Field(
        default=False,
        description="Set by verification (POST .../contacts/{id}/verify); ignored on input.",
    )
    bounced: bool = Field(default=False, description="Set by delivery feedback; ignored on input.")
    complained: bool = Field(
        default=False, description="Set when the recipient reports spam; ignored on input."
    )
    id: ContactId | None = Field(
        default=None, description="Assigned by the platform (a new address gets a new one)."
    )


class PhoneContact(_In):
    number: Annotated[str, Field(max_length=40, description="E.164, e.g. +14155550100")]
    verified: bool = Field(default=False, description="Set by verification; ignored on input.")
    opted_out: bool = Field(
        default=False, description="Set when the recipient replies STOP; ignored on input."
    )
    id: ContactId | None = Field(
        default=None, description="Assigned by the platform (a new number gets a new one)."
    )


class PushToken(_In):
    platform: PushPlatform
    token: Annotated[str, Field(min_length=1, max_length=4096)]
    app: Annotated[str, Field(max_length=200)] | None = None
    invalid: bool = Field(default=False, description="Set by delivery feedback; ignored on input.")


class CategoryPreference(_In):
    enabled: bool = True
    channels: list[Channel] | None = None
    digest: bool = False


class Consent(_In):
    purpose: Slug
    granted: bool
    at: AwareDatetime | None = Field(
        default=None, description="When given; a new consent is stamped with the server's time."
    )
    source: Annotated[str, Field(max_length=100)] | None = None


class QuietWindow(_In):
    days: Annotated[list[Annotated[int, Field(ge=1, le=7)]], Field(min_length=1, max_length=7)] = [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
    ]
    start: Annotated[str, Field(pattern=r"^\d\d:\d\d$", examples=["22:00"])]
    end: Annotated[str, Field(pattern=r"^\d\d:\d\d$", examples=["07:00"])]


class FrequencyCap(_In):
    channel: Channel | None = None
    category: Slug | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_CAP_LIMIT)]
    window_seconds: Annotated[int, Field(ge=1, le=MAX_CAP_WINDOW_SECONDS)]


class PreferencesIn(_In):
    user_id: UserId | None = Field(default=None, description="If given, must be the path's user.")
    locale: str = "en"
    timezone: str = "UTC"
    emails: Annotated[
        list[EmailContact | Annotated[str, Field(max_length=254)]], Field(max_length=MAX_EMAILS)
    ] = []
    phones: Annotated[
        list[PhoneContact | Annotated[str, Field(max_length=40)]], Field(max_length=MAX_PHONES)
    ] = []
    push_tokens: Annotated[list[PushToken], Field(max_length=MAX_PUSH_TOKENS)] = []
    channels: dict[Channel, bool] = {}
    categories: Annotated[dict[str, CategoryPreference], Field(max_length=MAX_CATEGORIES)] = {}
    global_opt_out: bool = False
    consents: Annotated[list[Consent], Field(max_length=MAX_CONSENTS)] = []
    quiet_hours: Annotated[list[QuietWindow], Field(max_length=MAX_QUIET_WINDOWS)] = []
    caps: Annotated[list[FrequencyCap], Field(max_length=MAX_CAPS)] = []
    updated_at: datetime | None = Field(default=None, description="Ignored: the server sets it.")


class Preferences(_Out):
    user_id: str
    locale: str
    timezone: str
    emails: list[dict[str, Any]]
    phones: list[dict[str, Any]]
    push_tokens: list[dict[str, Any]]
    channels: dict[str, bool]
    categories: dict[str, dict[str, Any]]
    global_opt_out: bool
    consents: list[dict[str, Any]]
    quiet_hours: list[dict[str, Any]]
    caps: list[dict[str, Any]]
    updated_at: datetime


# -- inbox -----------------------------------------------------------------------------


class InboxMessage(_Out):
    model_config = ConfigDict(extra="allow")

    message_id: str
    request_id: str | None = None
    category: str | None = None
    priority: str | None = None
    subject: str | None = None
    body: str | None = None
    data: dict[str, str] = {}
    created_at: str | None = None
    read: bool
    archived: bool


class InboxPage(_Out):
    items: list[InboxMessage]
    unread: int
    total: int
    next_before: float | None = Field(
        description="Pass as `before` for the next (older) page; null on the last page."
    )


class InboxUpdate(_In):
    read: bool | None = None
    archived: bool | None = None


# -- notifications ------------------------------------------------------------------


class NotificationIn(_In):
    user_id: UserId
    category: Slug
    priority: Priority = "NORMAL"
    template: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
    data: Annotated[
        dict[Annotated[str, Field(max_length=100)], Annotated[str, Field(max_length=4000)]],
        Field(max_length=100),
    ] = {}
    channels: Annotated[list[RequestChannel], Field(max_length=4)] = []
    deliver_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    collapse_key: Annotated[str, Field(min_length=1, max_length=200)] | None = None


class NotificationAccepted(_Out):
    request_id: str
    user_id: str
    status: Literal["accepted"]


# -- scheduled notifications -----------------------------------------------------------


class ScheduledItem(_Out):
    item_id: str
    user_id: str
    kind: Literal["request", "digest"]
    state: Literal["held", "rescheduled"]
    reason: str = Field(description="Why it is held: deliver_at, quiet_hours or digest.")
    due: str = Field(description="When the router releases it (ISO 8601).")
    category: str
    template: str | None = None
    priority: str | None = None
    channels: list[str] = []
    items: int = Field(description="Messages in a digest (1 for a request).")
    command_id: str | None = None
    updated_at: str


class ScheduledList(_Out):
    user_id: str
    items: list[ScheduledItem]


class RescheduleIn(_In):
    deliver_at: AwareDatetime = Field(
        description="The new release time: in the future, at most 366 days ahead."
    )


class ScheduleCommandAccepted(_Out):
    command_id: str
    user_id: str
    item_id: str
    action: Literal["cancel", "reschedule"]
    status: Literal["accepted"]


# -- webhooks & health ------------------------------------------------------------------


class WebhookAck(_Out):
    accepted: int
    ignored: int


class Health(_Out):
    status: str


class Readiness(_Out):
    ready: bool
    checks: dict[str, str]


# -- examples (documentation, and seeds for the API's fuzz tests) -------------------------


def _examples(**named: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {"summary": name.replace("_", " "), "value": value} for name, value in named.items()
    }


RULE_EXAMPLES = _examples(
    above_a_price={"symbol": "AAPL", "condition": "GREATER_THAN", "value": "190"},
    entering_a_channel={
        "symbol": "MSFT",
        "condition": "ENTERING_CHANNEL",
        "lower": "400",
        "upper": "420",
        "frequency": "ONCE_PER_BAR",
    },
    falling_five_percent={
        "symbol": "TSLA",
        "condition": "MOVING_DOWN_PERCENT",
        "percent": "5",
        "bars": 3,
        "frequency": "EVERY_TIME",
        "cooldown_seconds": 600,
        "message": "TSLA is sliding",
    },
)
RULE_PATCH_EXAMPLES = _examples(disable={"enabled": False}, move_level={"value": "195.5"})
PREFERENCES_EXAMPLES = _examples(
    contacts_and_quiet_hours={
        "locale": "en-GB",
        "timezone": "Europe/London",
        "emails": [{"address": "alice@example.com"}],
        "phones": [{"number": "+447700900123"}],
        "channels": {"email": True, "sms": False},
        "categories": {"price_alert": {"enabled": True, "channels": ["push", "inapp"]}},
        "consents": [{"purpose": "marketing", "granted": False}],
        "quiet_hours": [{"days": [1, 2, 3, 4, 5], "start": "22:00", "end": "07:00"}],
        "caps": [{"channel": "sms", "limit": 5, "window_seconds": 86400}],
    }
)
PREFERENCES_PATCH_EXAMPLES = _examples(
    change_locale={"locale": "fr"}, clear_quiet_hours={"quiet_hours": None}
)
INBOX_EXAMPLES = _examples(mark_read={"read": True}, archive={"archived": True})
NOTIFICATION_EXAMPLES = _examples(
    order_shipped={
        "user_id": "alice",
        "category": "account",
        "priority": "HIGH",
        "template": "message",
        "data": {"title": "Order 42 shipped", "body": "Your order is on its way."},
        "channels": ["EMAIL", "INAPP"],
    }
)
