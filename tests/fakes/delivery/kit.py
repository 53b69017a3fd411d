"""Every delivery fake at once, with the keys and settings that point at them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from tests.fakes.delivery.sendgrid import FakeSendGrid
from tests.fakes.delivery.ses import FakeSes
from tests.fakes.delivery.smtp import FakeSmtp

from finstream.sandbox.apns import FakeApns
from finstream.sandbox.base import FakeThread
from finstream.sandbox.fcm import FakeFcm, write_service_account
from finstream.sandbox.tls import make_certs
from finstream.sandbox.twilio import FakeTwilio
from finstream.settings import Settings

APNS_TEAM = "TEAM123456"
APNS_KEY_ID = "KEY1234567"
APNS_TOPIC = "io.finstream.app"
SMTP_USER, SMTP_PASSWORD = "mailer", "smtp-secret"
TWILIO_FROM = "+15005550006"

# Short clocks so that retries, circuits, leases and reconciliation happen in
# test time; the fakes' `hang` is longer than the client timeout.
FAST = {
    "delivery_timeout": 1.0,
    "delivery_backoff_base": 0.05,
    "delivery_backoff_cap": 0.4,
    "delivery_poll_interval": 0.1,
    "delivery_reconcile_delay": 0.2,
    "delivery_circuit_failures": 3,
    "delivery_circuit_reset": 1.0,
    "delivery_lease_seconds": 2.0,
    "delivery_rate_wait_max": 0.2,
    "delivery_batch_ms": 50,
}


class DeliveryFakes:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.certs = make_certs(folder / "tls")
        apns_key = ec.generate_private_key(ec.SECP256R1())
        self.apns_key_file = folder / "AuthKey.p8"
        self.apns_key_file.write_bytes(
            apns_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.sendgrid = FakeSendGrid()
        self.ses = FakeSes()
        self.fcm = FakeFcm()
        self.twilio = FakeTwilio()
        self.apns = FakeApns(
            self.certs,
            team_id=APNS_TEAM,
            key_id=APNS_KEY_ID,
            public_key=apns_key.public_key(),
            topic=APNS_TOPIC,
        )
        self.smtp = FakeSmtp(self.certs, users={SMTP_USER: SMTP_PASSWORD})
        self.all = [self.sendgrid, self.ses, self.fcm, self.twilio, self.apns, self.smtp]
        self._thread = FakeThread(self.all)
        self.service_account = folder / "service-account.json"

    def __enter__(self) -> DeliveryFakes:
        self._thread.__enter__()
        self.service_account, self.fcm.public_key = write_service_account(
            self.folder, f"{self.fcm.url}/token", self.fcm.project_id
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.__exit__(*exc)

    def reset(self) -> None:
        for fake in self.all:
            fake.faults.reset()

    def overrides(self, **extra: Any) -> dict[str, Any]:
        """Settings fields (typed) that point every provider at its fake."""
        values: dict[str, Any] = {
            **FAST,
            "delivery_sendgrid_url": self.sendgrid.url,
            "delivery_sendgrid_api_key": SecretStr(self.sendgrid.api_key),
            "delivery_ses_url": self.ses.url,
            "delivery_ses_region": self.ses.region,
            "delivery_ses_access_key_id": self.ses.access_key,
            "delivery_ses_secret_access_key": SecretStr(self.ses.secret_key),
            "delivery_smtp_host": "127.0.0.1",
            "delivery_smtp_port": self.smtp.port,
            "delivery_smtp_security": "starttls",
            "delivery_smtp_username": SMTP_USER,
            "delivery_smtp_password": SecretStr(SMTP_PASSWORD),
            "delivery_smtp_ca_file": self.certs.ca_file,
            "delivery_fcm_url": self.fcm.url,
            "delivery_fcm_service_account_file": self.service_account,
            "delivery_apns_url": self.apns.url,
            "delivery_apns_key_file": self.apns_key_file,
            "delivery_apns_key_id": APNS_KEY_ID,
            "delivery_apns_team_id": APNS_TEAM,
            "delivery_apns_topic": APNS_TOPIC,
            "delivery_apns_ca_file": self.certs.ca_file,
            "delivery_twilio_url": self.twilio.url,
            "delivery_twilio_account_sid": self.twilio.account_sid,
            "delivery_twilio_auth_token": SecretStr(self.twilio.auth_token),
            "delivery_twilio_from": TWILIO_FROM,
            "delivery_twilio_status_callback": "https://hooks.finstream.local/twilio/status",
        }
        values.update(extra)
        return values

    def settings(self, base: Settings, **extra: Any) -> Settings:
        return base.model_copy(update=self.overrides(**extra))

    def env(self, **extra: Any) -> dict[str, str]:
        """The same, as strings for a worker subprocess's environment."""
        out = {}
        for key, value in self.overrides(**extra).items():
            plain = value.get_secret_value() if isinstance(value, SecretStr) else value
            out[key] = str(plain)
        return out
