"""The sandbox's accounts and keys, and the settings that point delivery workers at them.

Written under ``<stack_dir>/sandbox/`` by :func:`create` (``finstream run``
calls it before starting any role), read by :func:`load` (the ``sandbox`` role
and the delivery workers): a CA and a server certificate for the APNs
sandbox's TLS, an APNs signing key (.p8), and an FCM service-account file
whose ``token_uri`` is the sandbox's token endpoint. They are created afresh
on every run, so nothing here is a secret worth keeping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from finstream.sandbox.fcm import write_service_account
from finstream.sandbox.tls import Certs, make_certs
from finstream.settings import Settings

APNS_TEAM = "SANDBOXTM1"
APNS_KEY_ID = "SANDBOXKY1"
APNS_TOPIC = "io.finstream.demo"
FCM_PROJECT = "finstream-sandbox"
TWILIO_SID = "AC" + "5a" * 16
TWILIO_TOKEN = "sandbox-auth-token"  # noqa: S105 (a sandbox account, created per run)
TWILIO_FROM = "+15005550006"


@dataclass(frozen=True)
class Credentials:
    folder: Path
    certs: Certs
    apns_key_file: Path
    fcm_account_file: Path

    def apns_public_key(self) -> Any:
        key = serialization.load_pem_private_key(self.apns_key_file.read_bytes(), password=None)
        return key.public_key()

    def fcm_public_key(self) -> Any:
        info = json.loads(self.fcm_account_file.read_text())
        key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
        return key.public_key()


def folder(settings: Settings) -> Path:
    return settings.stack_dir / "sandbox"


def create(settings: Settings) -> Credentials:
    """Fresh certificates and keys for this run's sandbox."""
    root = folder(settings)
    root.mkdir(parents=True, exist_ok=True)
    certs = make_certs(root / "tls", days=30)
    key = ec.generate_private_key(ec.SECP256R1())
    apns_key_file = root / "AuthKey_sandbox.p8"
    apns_key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    account, _ = write_service_account(root, f"{settings.sandbox_url}/token", FCM_PROJECT)
    return Credentials(root, certs, apns_key_file, account)


def load(settings: Settings) -> Credentials:
    root = folder(settings)
    tls = root / "tls"
    creds = Credentials(
        root,
        Certs(tls / "ca.pem", tls / "server.pem", tls / "server.key"),
        root / "AuthKey_sandbox.p8",
        root / "service-account.json",
    )
    missing = [
        p
        for p in (creds.certs.ca_file, creds.certs.cert_file, creds.apns_key_file)
        if not p.is_file()
    ]
    if missing or not creds.fcm_account_file.is_file():
        raise FileNotFoundError(
            f"sandbox credentials missing under {root} (`finstream run` creates them)"
        )
    return creds


def delivery_overrides(settings: Settings, creds: Credentials) -> dict[str, str]:
    """FINSTREAM_* fields (lower case, as strings) that send email to Mailpit and push
    and SMS to the sandbox."""
    return {
        # Mailpit: plain SMTP on loopback, no authentication.
        "delivery_email_providers": "smtp",
        "delivery_smtp_host": settings.sandbox_host,
        "delivery_smtp_port": str(settings.mailpit_smtp_port),
        "delivery_smtp_security": "none",
        "delivery_fcm_url": settings.sandbox_url,
        "delivery_fcm_service_account_file": str(creds.fcm_account_file),
        "delivery_apns_url": f"https://{settings.sandbox_host}:{settings.sandbox_apns_port}",
        "delivery_apns_key_file": str(creds.apns_key_file),
        "delivery_apns_key_id": APNS_KEY_ID,
        "delivery_apns_team_id": APNS_TEAM,
        "delivery_apns_topic": APNS_TOPIC,
        "delivery_apns_ca_file": str(creds.certs.ca_file),
        "delivery_twilio_url": settings.sandbox_url,
        "delivery_twilio_account_sid": TWILIO_SID,
        "delivery_twilio_auth_token": TWILIO_TOKEN,
        "delivery_twilio_from": TWILIO_FROM,
    }
