"""A secured local Kafka: TLS certificates made at start-up, SASL users, mTLS.

When the clients' settings ask for a secured cluster
(``FINSTREAM_KAFKA_SECURITY_PROTOCOL`` SSL, SASL_SSL or SASL_PLAINTEXT),
``finstream stack up`` starts its own broker with a listener of that protocol
on the bootstrap port, so that the security settings are exercised locally as
production uses them:

* a certificate authority and a broker certificate (for ``localhost``,
  ``127.0.0.1`` and the bootstrap host) are made with ``cryptography`` under
  ``<stack_dir>/kafka/tls/`` and kept until they near their end; the broker
  reads them as PEM files (Kafka's ``ssl.keystore.type=PEM``). The CA is
  copied to ``FINSTREAM_KAFKA_SSL_CA_FILE`` for the clients;
* SASL: PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 are all enabled. The client
  user (``FINSTREAM_KAFKA_SASL_USERNAME``/``..._PASSWORD``) is a PLAIN user
  of the listener's JAAS configuration and gets SCRAM credentials once the
  broker is up (KIP-554, as Strimzi's User Operator does), set by the broker's
  own user over PLAIN;
* SSL (mTLS): the listener requires a client certificate signed by the CA;
  one is made at ``FINSTREAM_KAFKA_SSL_CERT_FILE``/``..._KEY_FILE`` when
  those files do not exist.

The controller listener stays plaintext on loopback. No authorizer runs: an
authenticated client may do everything (production ACLs: deploy/README.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from finstream.settings import Settings

BROKER_USER = "finstream-broker"
VALIDITY = dt.timedelta(days=365)
# Certificates are made again when less than this is left.
RENEW_BEFORE = dt.timedelta(days=7)


class SecurityError(RuntimeError):
    """The secured stack cannot be set up; the message is one line."""


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    broker_pem: Path  # the broker's key and certificate chain, one PEM file


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "finstream local stack"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8, unencrypted: what Kafka's PEM keystore and librdkafka both read.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _valid(path: Path, now: dt.datetime) -> bool:
    if not path.exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        return False
    return cert.not_valid_after_utc - now > RENEW_BEFORE


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    *,
    hosts: tuple[str, ...] = (),
    client: bool = False,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        # The broker is also a client of itself (inter-broker listener).
        usages = [usage] if client else [usage, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def ensure_certificates(tls_dir: Path, hosts: tuple[str, ...]) -> TlsFiles:
    """The stack's CA and broker certificate, made (again) when missing or near their end."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(tls_dir / "ca.crt", tls_dir / "ca.key", tls_dir / "broker.pem")
    now = dt.datetime.now(dt.UTC)
    if _valid(files.ca_cert, now) and files.ca_key.exists():
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _issue("finstream local CA", ca_key, None, ca_key, now)
        files.ca_key.write_bytes(_key_pem(ca_key))
        files.ca_key.chmod(0o600)
        files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        files.broker_pem.unlink(missing_ok=True)  # signed by the old CA
    if not _valid(files.broker_pem, now) or not _names(files.broker_pem, hosts):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue("kafka", key, ca, ca_key, now, hosts=hosts)
        files.broker_pem.write_bytes(
            _key_pem(key)
            + cert.public_bytes(serialization.Encoding.PEM)
            + ca.public_bytes(serialization.Encoding.PEM)
        )
        files.broker_pem.chmod(0o600)
    return files


def _names(pem: Path, hosts: tuple[str, ...]) -> bool:
    """The certificate in ``pem`` names every host."""
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(n) for n in san.get_values_for_type(x509.DNSName)}
    have |= {str(n) for n in san.get_values_for_type(x509.IPAddress)}
    return set(hosts) <= have


def issue_client_certificate(files: TlsFiles, cert_file: Path, key_file: Path, name: str) -> None:
    """A client certificate (CN=name) signed by the stack's CA, for mutual TLS."""
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(name, key, ca, ca_key, dt.datetime.now(dt.UTC), client=True)
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_bytes(_key_pem(key))
    key_file.chmod(0o600)
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _jaas_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class SecuredBroker:
    """The broker properties and start-up steps of a secured local listener."""

    def __init__(self, settings: Settings, kafka_dir: Path, host: str, port: int) -> None:
        self.settings = settings
        self.protocol = settings.kafka_security_protocol
        self.tls_dir = kafka_dir / "tls"
        self.host = host
        self.port = port

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol.endswith("SSL")

    def _broker_password(self) -> str:
        path = self.tls_dir / "broker.password"
        if not path.exists():
            self.tls_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(24))
            path.chmod(0o600)
        return path.read_text().strip()

    def prepare(self) -> dict[str, str]:
        """Certificates and client files in place; the broker properties of the listener."""
        name = self.protocol
        props = {
            "listeners": f"{name}://{self.host}:{self.port},CONTROLLER://127.0.0.1:{{ctrl}}",
            "advertised.listeners": f"{name}://{self.host}:{self.port}",
            "inter.broker.listener.name": name,
            "listener.security.protocol.map": f"{name}:{name},CONTROLLER:PLAINTEXT",
        }
        lname = name.lower()
        if self.tls:
            files = ensure_certificates(
                self.tls_dir, tuple(dict.fromkeys(("localhost", "127.0.0.1", self.host)))
            )
            self._install_ca(files)
            props.update(
                {
                    "ssl.keystore.type": "PEM",
                    "ssl.keystore.location": str(files.broker_pem),
                    "ssl.truststore.type": "PEM",
                    "ssl.truststore.location": str(files.ca_cert),
                    # SSL alone authenticates clients by certificate (mTLS).
                    "ssl.client.auth": "none" if self.sasl else "required",
                }
            )
            if not self.sasl:
                self._install_client_certificate(files)
        if self.sasl:
            user = self.settings.kafka_sasl_username or ""
            password = self.settings.kafka_sasl_password
            assert password is not None  # Settings checks it
            broker_pw = self._broker_password()
            plain = (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f"username={_jaas_quote(BROKER_USER)} password={_jaas_quote(broker_pw)} "
                f"user_{BROKER_USER}={_jaas_quote(broker_pw)}"
            )
            if user != BROKER_USER:
                plain += f" user_{user}={_jaas_quote(password.get_secret_value())}"
            scram = "org.apache.kafka.common.security.scram.ScramLoginModule required"
            props.update(
                {
                    "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
                    "sasl.mechanism.inter.broker.protocol": "PLAIN",
                    f"listener.name.{lname}.plain.sasl.jaas.config": plain + ";",
                    f"listener.name.{lname}.scram-sha-256.sasl.jaas.config": scram + ";",
                    f"listener.name.{lname}.scram-sha-512.sasl.jaas.config": scram + ";",
                }
            )
        return props

    def _install_ca(self, files: TlsFiles) -> None:
        target = self.settings.kafka_ssl_ca_file
        if target is None:
            raise SecurityError(
                f"a {self.protocol} stack needs the clients to trust its CA: set "
                f"FINSTREAM_KAFKA_SSL_CA_FILE={files.ca_cert}"
            )
        ca = files.ca_cert.read_bytes()
        if target != files.ca_cert and (not target.exists() or target.read_bytes() != ca):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(ca)

    def _install_client_certificate(self, files: TlsFiles) -> None:
        cert, key = self.settings.kafka_ssl_cert_file, self.settings.kafka_ssl_key_file
        if cert is None or key is None:
            raise SecurityError(
                "an SSL stack authenticates clients by certificate: set "
                "FINSTREAM_KAFKA_SSL_CERT_FILE and FINSTREAM_KAFKA_SSL_KEY_FILE "
                "(made there, signed by the stack's CA, when missing)"
            )
        if cert.exists() and key.exists() and _signed_by(cert, files.ca_cert):
            return
        issue_client_certificate(files, cert, key, self.settings.kafka_sasl_username or "finstream")

    def admin_config(self) -> dict[str, Any]:
        """The broker's own user (PLAIN), for set-up steps before the client user exists."""
        config: dict[str, Any] = {
            "bootstrap.servers": f"{self.host}:{self.port}",
            "security.protocol": self.protocol.lower(),
            "log_level": 0,
        }
        if self.tls:
            config["ssl.ca.location"] = str(self.tls_dir / "ca.crt")
            if not self.sasl:
                config["ssl.certificate.location"] = str(self.settings.kafka_ssl_cert_file)
                config["ssl.key.location"] = str(self.settings.kafka_ssl_key_file)
        if self.sasl:
            config.update(
                {
                    "sasl.mechanism": "PLAIN",
                    "sasl.username": BROKER_USER,
                    "sasl.password": self._broker_password(),
                }
            )
        return config

    def create_users(self, admin: Any) -> None:
        """SCRAM credentials of the client user, for both SCRAM mechanisms."""
        if not self.sasl:
            return
        from confluent_kafka.admin import (  # type: ignore[attr-defined]
            ScramCredentialInfo,
            ScramMechanism,
            UserScramCredentialUpsertion,
        )

        user = self.settings.kafka_sasl_username or ""
        password = self.settings.kafka_sasl_password
        assert password is not None
        # One alteration per user and request (the broker refuses two).
        for mechanism in (ScramMechanism.SCRAM_SHA_256, ScramMechanism.SCRAM_SHA_512):
            upsert = UserScramCredentialUpsertion(
                user, ScramCredentialInfo(mechanism, 8192), password.get_secret_value().encode()
            )
            for fut in admin.alter_user_scram_credentials([upsert]).values():
                fut.result(timeout=30)


def _signed_by(cert_file: Path, ca_file: Path) -> bool:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
