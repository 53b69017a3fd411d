"""An alert firing: the rule, the tick that made it fire, and the records it
publishes (``alerts.fired`` and a ``notify.requests`` entry), under an id that
the live role and back-testing compute alike.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from finstream.domain.alerts.rules import AlertRule
from finstream.domain.marketdata.bars import decimal_text


def fired_id(rule_id: str, tick_id: str) -> str:
    """Deterministic: the same rule fired by the same tick always has the same id."""
    digest = hashlib.sha256(f"{rule_id}\x1f{tick_id}".encode()).hexdigest()
    return f"f-{digest[:40]}"


@dataclass(frozen=True, slots=True)
class Firing:
    fired_id: str
    rule: AlertRule
    price: Decimal
    tick_id: str
    tick_ts: datetime
    at_bar_close: bool = False

    @property
    def request_id(self) -> str:
        """The NotificationRequest's idempotency key, derived from the firing."""
        return f"alert-{self.fired_id[2:]}"

    def title(self) -> str:
        what = self.rule.describe().split(" ", 1)[1]
        return f"{self.rule.symbol} alert: {what}"

    def body(self) -> str:
        when = self.tick_ts.strftime("%Y-%m-%d %H:%M:%S UTC")
        close = " at the bar close" if self.at_bar_close else ""
        text = f"{self.rule.symbol} traded at {decimal_text(self.price)}{close} ({when})."
        if self.rule.message:
            text += f" {self.rule.message}"
        return text

    def alert_fired(self, fired_at: datetime) -> dict[str, Any]:
        return {
            "fired_id": self.fired_id,
            "rule_id": self.rule.rule_id,
            "user_id": self.rule.user_id,
            "symbol": self.rule.symbol,
            "condition": self.rule.condition,
            "price": self.price,
            "tick_id": self.tick_id,
            "tick_ts": self.tick_ts,
            "fired_at": fired_at,
            "message": self.rule.message,
        }

    def notification_request(self, created_at: datetime) -> dict[str, Any]:
        rule = self.rule
        data = {
            "symbol": rule.symbol,
            "price": decimal_text(self.price),
            "condition": rule.condition,
            "rule_id": rule.rule_id,
            "fired_id": self.fired_id,
            "frequency": rule.frequency,
            "tick_id": self.tick_id,
            "tick_ts": self.tick_ts.isoformat(),
            "description": rule.describe(),
            "title": self.title(),
            "body": self.body(),
        }
        if rule.message:
            data["message"] = rule.message
        return {
            "request_id": self.request_id,
            "user_id": rule.user_id,
            "category": "price_alert",
            "priority": "HIGH",
            "template": "price_alert",
            "data": data,
            "channels": [],
            "deliver_at": None,
            "expires_at": None,
            # Repeated firings of one rule replace each other on a device.
            "collapse_key": f"price_alert:{rule.rule_id}",
            "created_at": created_at,
            "source": "alerts",
            "correlation_id": self.fired_id,
        }
