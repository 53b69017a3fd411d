"""The sinks (history, inboxes) and the delivery workers' provider chains (issue 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr


class DeliverySettings(BaseModel):
    """A group of the fields of :class:`finstream.settings.Settings`."""

    # -- sinks -------------------------------------------------------------------
    history_batch_size: int = Field(default=5000, gt=0)
    history_batch_ms: int = Field(default=50, gt=0)
    inbox_max_messages: int = Field(default=500, gt=0)

    # Delivery workers (issue 6): delivery-email, delivery-push, delivery-sms and
    # inapp. Each channel has an ordered provider chain (failover order); a
    # provider without credentials is left out of its chain. Base URLs are
    # settings so that tests point them at local fakes. Rates are requests per
    # second per worker (a token bucket with a one-second burst).
    delivery_email_providers: str = Field(
        default="sendgrid,ses,smtp", description="Email chain, in failover order."
    )
    delivery_push_providers: str = Field(
        default="fcm,apns", description="Push providers (each takes its platform's tokens)."
    )
    delivery_sms_providers: str = "twilio"
    delivery_batch_size: int = Field(default=200, gt=0)
    delivery_batch_ms: int = Field(default=100, gt=0)
    delivery_concurrency: int = Field(default=16, gt=0, description="Provider calls in flight.")
    delivery_max_attempts: int = Field(default=6, ge=1, description="Provider calls per message.")
    delivery_backoff_base: float = Field(default=1.0, gt=0)
    delivery_backoff_cap: float = Field(default=300.0, gt=0)
    delivery_max_age: float = Field(
        default=86_400.0,
        gt=0,
        description="Seconds after created_at when a message without expires_at expires.",
    )
    delivery_timeout: float = Field(default=10.0, gt=0, description="Provider request timeout.")
    delivery_lease_seconds: float = Field(
        default=30.0, gt=0, description="A claimed message another worker may take over after this."
    )
    delivery_poll_interval: float = Field(
        default=0.5, gt=0, description="Seconds between scans for due retries and lapsed leases."
    )
    delivery_reconcile_delay: float = Field(
        default=30.0, ge=0, description="Wait before looking up an ambiguous send at the provider."
    )
    delivery_unknown_outcome: Literal["deadletter", "resend"] = Field(
        default="deadletter",
        description="A send whose outcome is unknown and cannot be looked up: dead-letter it "
        "(never twice) or send it again (never lost).",
    )
    delivery_circuit_failures: int = Field(default=5, ge=1)
    delivery_circuit_reset: float = Field(default=30.0, gt=0)
    delivery_rate_wait_max: float = Field(
        default=0.5, ge=0, description="Longest inline wait for a rate limit before failing over."
    )
    delivery_idempotency_ttl: int = Field(
        default=7 * 86_400, gt=0, description="Seconds Redis remembers a finished message."
    )
    delivery_email_from: str = "finstream <alerts@finstream.local>"
    delivery_email_unsubscribe_url: str | None = Field(
        default="https://finstream.local/v1/unsubscribe/{token}",
        description="List-Unsubscribe target of marketing email: the API's one-click endpoint "
        "with {token} (a signed, expiring link). The placeholder host is refused outside dev/test.",
    )
    delivery_email_unsubscribe_mailto: str | None = "unsubscribe@finstream.local"
    delivery_sendgrid_url: str = "https://api.sendgrid.com"
    delivery_sendgrid_api_key: SecretStr | None = None
    delivery_sendgrid_rate: float = Field(default=100.0, gt=0)
    delivery_sendgrid_activity_lookup: bool = Field(
        default=True, description="Reconcile ambiguous sends with the Email Activity API."
    )
    delivery_ses_url: str | None = Field(
        default=None, description="Default: https://email.<region>.amazonaws.com"
    )
    delivery_ses_region: str = "us-east-1"
    delivery_ses_access_key_id: str | None = None
    delivery_ses_secret_access_key: SecretStr | None = None
    delivery_ses_configuration_set: str | None = None
    delivery_ses_rate: float = Field(default=14.0, gt=0)
    delivery_smtp_host: str | None = None
    delivery_smtp_port: int = 587
    delivery_smtp_security: Literal["none", "starttls", "tls"] = "starttls"
    delivery_smtp_username: str | None = None
    delivery_smtp_password: SecretStr | None = None
    delivery_smtp_ca_file: Path | None = None
    delivery_smtp_validate_certs: bool = True
    delivery_smtp_rate: float = Field(default=20.0, gt=0)
    delivery_fcm_url: str = "https://fcm.googleapis.com"
    delivery_fcm_project_id: str | None = None
    delivery_fcm_service_account_file: Path | None = None
    delivery_fcm_token_url: str | None = Field(
        default=None, description="OAuth2 token endpoint; default: the service account's token_uri."
    )
    delivery_fcm_rate: float = Field(default=500.0, gt=0)
    delivery_apns_url: str = "https://api.push.apple.com"
    delivery_apns_key_file: Path | None = Field(default=None, description="The .p8 signing key.")
    delivery_apns_key_id: str | None = None
    delivery_apns_team_id: str | None = None
    delivery_apns_topic: str | None = Field(default=None, description="The app's bundle id.")
    delivery_apns_ca_file: Path | None = None
    delivery_apns_rate: float = Field(default=500.0, gt=0)
    delivery_twilio_url: str = "https://api.twilio.com"
    delivery_twilio_account_sid: str | None = None
    delivery_twilio_auth_token: SecretStr | None = None
    delivery_twilio_from: str | None = None
    delivery_twilio_messaging_service_sid: str | None = None
    delivery_twilio_status_callback: str | None = None
    delivery_twilio_rate: float = Field(default=10.0, gt=0)
