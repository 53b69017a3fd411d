"""The API's privacy models: contact verification, erasure, unsubscribe and the
delivery funnel (issue 14). Shared bases in :mod:`finstream.api.models`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from finstream.api.models import _In, _Out


class VerifyIn(_In):
    code: Annotated[str, Field(pattern=r"^\s*\d{6}\s*$", description="The six-digit code sent.")]


class ContactVerification(_Out):
    contact_id: str
    channel: Literal["email", "sms"]
    verified: bool
    verified_at: datetime | None = None
    expires_at: datetime | None = Field(
        default=None, description="When the code just sent stops working."
    )


class Erasure(_Out):
    user_id: str
    erased_at: datetime
    already_erased: bool = Field(description="True when the user was erased before: nothing new.")
    removed: dict[str, int] = Field(description="Rows, keys and tombstones removed, by store.")


class Unsubscribed(_Out):
    category: str
    scope: Literal["category", "marketing"]
    changed: bool = Field(description="False when the user had already opted out.")


class FunnelRow(_Out):
    model_config = ConfigDict(extra="allow")

    requests: int
    requested: int
    suppressed: int
    sent: int
    delivered: int
    opened: int
    clicked: int
    bounced: int
    complained: int
    unsubscribed: int
    failed: int


class Funnel(_Out):
    start: datetime = Field(alias="from")
    end: datetime = Field(alias="to")
    group_by: Literal["channel", "provider", "template", "category"]
    groups: list[FunnelRow]
    total: FunnelRow
