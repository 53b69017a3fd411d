"""The stream roles' own settings: bars and alerts (issue 4), notification routing (issue 5)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class StreamRoleSettings(BaseModel):
    """A group of the fields of :class:`finstream.settings.Settings`."""

    # Bars and alerts (issue 4). The quotes agent builds bars on exchange time
    # for every width in bar_intervals and publishes them to md.bars.1m (the
    # `interval` field tells widths apart); a tick that arrives more than
    # bar_allowed_lateness seconds after its bar's end goes to dlq. The `bars`
    # role stores bars in PostgreSQL and the latest bars_redis_keep per symbol
    # and width in Redis. The `alerts` role evaluates rules on bars of
    # alert_bar_interval (bar frequencies, moving windows, volume spikes).
    bar_intervals: str = Field(default="1m", description="Bar widths, comma-separated: 1m,5m,1h.")
    bar_allowed_lateness: float = Field(
        default=5.0,
        ge=0,
        description="Seconds after a bar's end during which late ticks correct it.",
    )
    bars_redis_keep: int = Field(default=500, gt=0, description="Bars kept per symbol and width.")
    bars_batch_size: int = Field(default=500, gt=0)
    bars_batch_ms: int = Field(default=200, gt=0)
    alert_bar_interval: str = Field(default="1m", description="Bar width of alert evaluation.")
    alert_max_rules_per_symbol: int = Field(
        default=2000, gt=0, description="More rules on one symbol are refused (dead-lettered)."
    )

    # Notification routing (issue 5). The `router` role routes notify.requests by
    # each user's preferences (notify.preferences) and releases held requests
    # (deliver_at, quiet hours) and digests every router_tick_seconds; the
    # `audit` role hash-chains audit.events into PostgreSQL. Windows are short
    # settings so that tests can shrink them.
    router_batch_size: int = Field(default=500, gt=0, description="Requests routed per batch.")
    router_batch_ms: int = Field(default=20, gt=0, description="Longest wait to fill a batch.")
    router_tick_seconds: float = Field(
        default=0.2, gt=0, le=1.0, description="How often due holds and digests are released."
    )
    router_dedupe_seconds: float = Field(
        default=86_400.0, gt=0, description="A request id seen again within this is a duplicate."
    )
    router_collapse_seconds: float = Field(
        default=60.0, ge=0, description="Requests sharing a collapse key within this go once."
    )
    router_digest_seconds: float = Field(
        default=3_600.0, gt=0, description="A digest collects a user's category for this long."
    )
    router_digest_max_items: int = Field(default=20, gt=0, description="Items listed per digest.")
    router_quiet_channels: str = Field(
        default="email,push,sms", description="Channels that quiet hours hold back."
    )
    router_sms_segments: int = Field(default=3, gt=0, le=10, description="SMS length limit.")
    router_default_locale: str = "en"
    audit_batch_size: int = Field(default=500, gt=0)
    audit_batch_ms: int = Field(default=200, gt=0)
