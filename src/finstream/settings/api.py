"""The API: its address, authentication (issue 8), limits, WebSockets and webhooks."""

from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr


class ApiSettings(BaseModel):
    """A group of the fields of :class:`finstream.settings.Settings`."""

    # -- api ---------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Authentication (issue 8). Tokens are OAuth2 bearer JWTs verified against a
    # JWKS (file path or http(s) URL). In env=dev without a JWKS, a development
    # key pair under <stack_dir>/api/ is used (`finstream api token` mints tokens).
    api_jwks: str | None = Field(default=None, description="JWKS file path or http(s) URL.")
    api_jwks_refresh_seconds: float = Field(default=300.0, gt=0)
    api_jwt_issuer: str = "finstream-dev"
    api_jwt_audience: str = "finstream-api"
    api_jwt_leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    api_jwt_roles_claim: str = "roles"
    api_jwt_hs256_secret: SecretStr | None = Field(
        default=None,
        description="Enables HS256 tokens with this shared secret (at least 32 bytes); "
        "unset, only asymmetric keys from the JWKS are accepted.",
    )
    api_public_url: str | None = Field(
        default=None,
        description="Public base URL of the API (behind proxies), used to check webhook signatures.",
    )
    api_max_body_bytes: int = Field(default=64 * 1024, gt=0)
    api_webhook_max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    api_rate_limit: int = Field(default=600, gt=0, description="Requests per window per token.")
    api_rate_window_seconds: float = Field(default=60.0, gt=0)
    api_idempotency_ttl_seconds: int = Field(default=86_400, gt=0)
    api_ws_queue_size: int = Field(default=256, gt=0, description="Messages buffered per client.")
    api_ws_max_subscriptions: int = Field(default=50, gt=0)
    api_ws_heartbeat_seconds: float = Field(default=15.0, gt=0)
    api_ws_auth_timeout_seconds: float = Field(default=10.0, gt=0)
    api_ws_max_message_bytes: int = Field(default=4096, gt=0)
    api_twilio_auth_token: SecretStr | None = Field(
        default=None, description="Checks X-Twilio-Signature on status callbacks."
    )
    api_sendgrid_webhook_public_key: str | None = Field(
        default=None,
        description="SendGrid Event Webhook verification key (base64 DER or PEM, ECDSA P-256).",
    )
