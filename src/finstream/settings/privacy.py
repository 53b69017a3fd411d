"""Privacy (issue 14): crypto-shredding, erasure, verification, and SES feedback over SNS."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr


class PrivacySettings(BaseModel):
    """A group of the fields of :class:`finstream.settings.Settings`."""

    # -- privacy (issue 14): crypto-shredding, erasure, verification, feedback ----------
    # Personal data is sealed under a data key per user (AES-256-GCM), wrapped by
    # a master key. Locally the master keys are a setting; in production either
    # the setting (from a Secret) or AWS KMS (privacy_kms=aws-kms). In
    # FINSTREAM_ENV dev and test a built-in development key is used when none is
    # set; any other environment refuses to start without one.
    privacy_master_keys: SecretStr | None = Field(
        default=None,
        description="Master keys, 'ID:BASE64(32 bytes)' comma-separated; the first wraps new "
        "data keys, every one unwraps (rotation: put the new one first, then "
        "`finstream keys rewrap`, then drop the old one).",
    )
    privacy_kms: Literal["local", "aws-kms"] = Field(
        default="local", description="Who wraps data keys: the master keys setting, or AWS KMS."
    )
    privacy_aws_kms_key_id: str | None = Field(default=None, description="KMS key id or ARN.")
    privacy_aws_kms_region: str = "us-east-1"
    privacy_aws_kms_url: str | None = Field(
        default=None, description="Default: https://kms.<region>.amazonaws.com"
    )
    privacy_aws_kms_attempts: int = Field(
        default=5,
        ge=1,
        le=20,
        description="Tries of one KMS request that is throttled or fails (5xx, transport), "
        "with exponential backoff and jitter between them.",
    )
    privacy_aws_kms_concurrency: int = Field(
        default=16,
        ge=1,
        le=256,
        description="KMS requests in flight at once per worker: a batch of users whose keys "
        "are not cached unwraps in parallel, within the account's request quota.",
    )
    privacy_aws_kms_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="One KMS request's timeout (then tried again)."
    )
    privacy_aws_access_key_id: str | None = None
    privacy_aws_secret_access_key: SecretStr | None = None
    privacy_key_cache_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="How long a worker keeps a user's unwrapped data keys: the longest a "
        "running worker can still open an erased user's data.",
    )
    privacy_key_cache_size: int = Field(default=100_000, gt=0, description="Users' keys cached.")
    privacy_token_secrets: SecretStr | None = Field(
        default=None,
        description="Secrets (comma-separated, at least 32 characters each; the first signs) "
        "for unsubscribe links and verification code digests; dev/test use a built-in one.",
    )
    privacy_erasure_sweep_seconds: float = Field(
        default=90.0,
        gt=0,
        description="An erasure sweeps again this long after it ran (past every worker's key "
        "cache), removing what a worker still wrote in between.",
    )
    privacy_verify_code_ttl_seconds: float = Field(default=900.0, gt=0)
    privacy_verify_max_attempts: int = Field(default=5, ge=1, description="Guesses per code.")
    privacy_verify_sends_per_hour: int = Field(
        default=5, ge=1, description="Codes sent per contact per hour."
    )
    privacy_verify_attempts_per_hour: int = Field(
        default=20, ge=1, description="Verification attempts per user per hour."
    )
    privacy_unsubscribe_ttl_days: float = Field(
        default=60.0, gt=0, description="How long an unsubscribe link in an email works."
    )
    api_sns_topic_arns: str = Field(
        default="",
        description="SNS topics whose SES notifications the API accepts (comma-separated ARNs).",
    )
    api_sns_cert_url_pattern: str = Field(
        default=r"^https://sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[A-Za-z0-9._/-]+\.pem$",
        description="Where SNS signing certificates may be fetched from (a regular expression).",
    )
    api_sns_confirm_subscriptions: bool = Field(
        default=True, description="Confirm SNS subscriptions of the configured topics."
    )
