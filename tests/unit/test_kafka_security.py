"""Kafka security settings: what librdkafka is given, what is refused, and the CLI's line.

The behaviour against a real secured broker (SASL_SSL with SCRAM, a wrong
password) is tests/integration/test_kafka_sasl_ssl.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from pydantic import ValidationError

from finstream.runtime.kafka import client_config, consumer_config, describe_cluster
from finstream.settings import Settings, describe_invalid
from finstream.stack_security import ensure_certificates, issue_client_certificate


def test_plaintext_default_adds_no_credentials() -> None:
    config = client_config(Settings())
    assert config["security.protocol"] == "plaintext"
    assert not [k for k in config if k.startswith(("sasl.", "ssl."))]


def test_sasl_ssl_with_scram_and_a_ca_bundle_reaches_every_client(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    settings = Settings(
        kafka_bootstrap="kafka:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="finstream-quotes",
        kafka_sasl_password="pw",  # type: ignore[arg-type]
        kafka_ssl_ca_file=ca,
    )
    expected = {
        "bootstrap.servers": "kafka:9093",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "finstream-quotes",
        "sasl.password": "pw",
        "ssl.ca.location": str(ca),
        "ssl.endpoint.identification.algorithm": "https",
    }
    # Producers, consumers and admin clients all start from client_config.
    for config in (client_config(settings), consumer_config(settings, "g")):
        assert expected.items() <= config.items()
    assert "pw" not in describe_cluster(settings)
    assert "'finstream-quotes' (SCRAM-SHA-512)" in describe_cluster(settings)


def test_mutual_tls_passes_the_client_certificate_and_key(tmp_path: Path) -> None:
    settings = Settings(
        kafka_security_protocol="SSL",
        kafka_ssl_ca_file=tmp_path / "ca.crt",
        kafka_ssl_cert_file=tmp_path / "user.crt",
        kafka_ssl_key_file=tmp_path / "user.key",
        kafka_ssl_key_password="kp",  # type: ignore[arg-type]
        kafka_ssl_verify_hostname=False,
    )
    config = client_config(settings)
    assert config["security.protocol"] == "ssl"
    assert config["ssl.certificate.location"] == str(tmp_path / "user.crt")
    assert config["ssl.key.location"] == str(tmp_path / "user.key")
    assert config["ssl.key.password"] == "kp"
    assert config["ssl.endpoint.identification.algorithm"] == "none"
    assert not [k for k in config if k.startswith("sasl.")]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"},
            "SASL_SSL needs FINSTREAM_KAFKA_SASL_USERNAME and FINSTREAM_KAFKA_SASL_PASSWORD",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cert_file": "/c"},
            "FINSTREAM_KAFKA_SSL_CERT_FILE and FINSTREAM_KAFKA_SSL_KEY_FILE go together",
        ),
        (
            {"kafka_ssl_ca_file": "/ca.crt"},
            "FINSTREAM_KAFKA_SECURITY_PROTOCOL is PLAINTEXT: use SSL or SASL_SSL",
        ),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "FINSTREAM_KAFKA_SASL_MECHANISM"),
    ],
)
def test_half_configured_security_is_refused_naming_the_settings(
    values: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**values)  # type: ignore[arg-type]
    assert message in describe_invalid(info.value)


def test_cli_names_an_invalid_setting_in_one_line() -> None:
    env = {
        **os.environ,
        "FINSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "FINSTREAM_KAFKA_SASL_USERNAME": "u",
    }
    env.pop("FINSTREAM_KAFKA_SASL_PASSWORD", None)
    proc = subprocess.run(
        [sys.executable, "-m", "finstream.cli", "topics", "apply", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: invalid settings: ")
    assert "FINSTREAM_KAFKA_SASL_PASSWORD" in proc.stderr


def test_stack_certificates_name_the_hosts_chain_to_the_ca_and_are_kept(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path, ("localhost", "127.0.0.1"))
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    broker = x509.load_pem_x509_certificate(files.broker_pem.read_bytes())
    broker.verify_directly_issued_by(ca)
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert b"PRIVATE KEY" in files.broker_pem.read_bytes()
    # A second start keeps them (clients keep trusting the same CA) ...
    before = files.ca_cert.read_bytes(), files.broker_pem.read_bytes()
    again = ensure_certificates(tmp_path, ("localhost", "127.0.0.1"))
    assert (again.ca_cert.read_bytes(), again.broker_pem.read_bytes()) == before
    # ... unless the broker's host changed: a new broker certificate, same CA.
    moved = ensure_certificates(tmp_path, ("localhost", "127.0.0.1", "kafka.local"))
    assert moved.ca_cert.read_bytes() == before[0]
    assert moved.broker_pem.read_bytes() != before[1]
    issue_client_certificate(files, tmp_path / "u.crt", tmp_path / "u.key", "alice")
    client = x509.load_pem_x509_certificate((tmp_path / "u.crt").read_bytes())
    client.verify_directly_issued_by(ca)
    assert client.subject.rfc4514_string().startswith("CN=alice")


# -- safe defaults: synthetic market data is refused in production ---------------------------


@pytest.mark.parametrize(
    ("env", "chain", "allow", "refused"),
    [
        ("production", "simulated", False, True),
        ("production", "yahoo,replay", False, True),
        ("production", "simulated", True, False),
        ("production", "yahoo,finnhub", False, False),
        ("dev", "simulated", False, False),
        ("staging", "replay", False, False),
    ],
)
def test_synthetic_market_data_is_refused_in_production_unless_allowed(
    env: str, chain: str, allow: bool, refused: bool
) -> None:
    from finstream.connectors.registry import ConfigError, chain_specs

    settings = Settings(env=env, md_chain=chain, md_allow_synthetic=allow, md_symbols="AAPL")
    if refused:
        with pytest.raises(ConfigError, match="FINSTREAM_MD_ALLOW_SYNTHETIC=true"):
            chain_specs(settings)
    else:
        assert chain_specs(settings)[0].providers == tuple(chain.split(","))


def test_connector_role_in_production_with_the_simulated_chain_stops_with_the_reason() -> None:
    env = {**os.environ, "FINSTREAM_ENV": "production", "FINSTREAM_MD_CHAIN": "simulated"}
    env["FINSTREAM_HTTP_PORT"] = "0"
    proc = subprocess.run(
        [sys.executable, "-m", "finstream.cli", "connect", "-p", "simulated", "-s", "AAPL"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "market data is not real, and FINSTREAM_ENV=production" in proc.stderr
    assert "Traceback" not in proc.stderr
