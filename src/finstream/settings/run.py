"""`finstream run` and the newcomer's demo: sandboxes, Mailpit, templates (issue 16)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from finstream.settings.common import absolute


class RunSettings(BaseModel):
    """A group of the fields of :class:`finstream.settings.Settings`."""

    # -- make run (finstream run) -------------------------------------------------
    run_roles: str = (
        "connector,quotes,history,router,inapp,bars,alerts,audit,statestore,api,"
        "sandbox,delivery-email,delivery-push,delivery-sms"
    )
    run_base_port: int = Field(
        default=9201, ge=1, le=65535, description="Health/metrics ports: one per role from here."
    )
    run_demo: bool = True

    # -- the newcomer's demo: sandboxes, seed data, console (issue 16) --------------
    # `finstream run` starts Mailpit (a real SMTP server with a web UI, built by
    # `make tools`) and the `sandbox` role (FCM, APNs and Twilio sandboxes that
    # keep what they receive and show it on a page), and points the email,
    # push and SMS delivery workers at them.
    run_sandboxes: bool = Field(
        default=True, description="finstream run: start Mailpit and the sandbox role, use them."
    )
    sandbox_host: str = "127.0.0.1"
    sandbox_port: int = Field(default=8090, description="Sandbox page, FCM and Twilio (HTTP).")
    sandbox_apns_port: int = Field(default=8091, description="APNs sandbox (HTTP/2 over TLS).")
    sandbox_keep: int = Field(default=500, gt=0, description="Messages each sandbox shows.")
    mailpit_bin: Path | None = Field(
        default=None, description="Mailpit binary (default: .tools/bin/mailpit, `make tools`)."
    )
    mailpit_smtp_port: int = 1025
    mailpit_http_port: int = 8025
    templates_dir: Path | None = Field(
        default=None,
        description="Templates that override or extend the packaged ones "
        "(<template>/<channel>.<locale>.j2 and _layouts/), reloaded without a restart.",
    )
    templates_reload_seconds: float = Field(
        default=2.0, ge=0, description="How often FINSTREAM_TEMPLATES_DIR is checked for changes."
    )
    status_timeout: float = Field(
        default=2.0, gt=0, description="finstream status: seconds to wait for each role."
    )

    @field_validator(
        "templates_dir",
        "mailpit_bin",
        mode="after",
    )
    @classmethod
    def _absolute_run_paths(cls, value: Path | None) -> Path | None:
        return absolute(value)
