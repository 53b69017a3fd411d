"""What a production deployment of the chart must never do, checked on every render.

issue 15: no role is deployed that cannot start (a delivery channel without a
configured provider, synthetic market data in production), and NOTES.txt says
which were left out; every Kafka client connects as its own Strimzi KafkaUser
with the ACLs its work needs; only the delivery roles and the connector reach
outside the cluster; the optional Istio and Cilium modes say what they should.
Renders come from tests/deploy/conftest.py (the base, each overlay, and prod
with Istio and Cilium on).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from finstream.roles import ROLES
from finstream.settings import Settings

from .conftest import CHART, DIGEST, NAMESPACE, RELEASE, ROOT, Render, Tools

PROVIDER_ROLES = {
    "delivery-email": "EMAIL",
    "delivery-push": "PUSH",
    "delivery-sms": "SMS",
}
MARKET_ROLES = ("connector", "simulator")
PUBLIC_IP = "198.51.100.7"  # TEST-NET-2: an address outside the cluster


def role_of(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] != "Pod" else doc["spec"]
    first: dict[str, Any] = spec["containers"][0]
    return first


def plain_env(doc: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(doc).get("env", []) if "value" in e}


def secret_env(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container(doc).get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


# -- stand-ins for what Secrets and mounted files would hold -------------------------------


@pytest.fixture(scope="module")
def provider_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files a provider reads at start (FCM service account, APNs key, a replay file)."""
    here = tmp_path_factory.mktemp("provider-files")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    account = here / "service-account.json"
    account.write_text(
        json.dumps(
            {
                "client_email": "push@example.iam.gserviceaccount.com",
                "private_key": rsa_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode(),
                "token_uri": "https://oauth2.example.com/token",
                "project_id": "example",
            }
        )
    )
    apns = here / "key.p8"
    apns.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    replay = here / "ticks.csv"
    replay.write_text("symbol,ts,price,size\nAAPL,2024-01-02T15:00:00Z,190.1,10\n")
    return {"FCM": account, "APNS": apns, "REPLAY": replay}


def settings_of(doc: dict[str, Any], files: dict[str, Path]) -> Settings:
    """The Settings a pod would read: plain values, and stand-ins for required Secrets."""
    env = {k: v for k, v in plain_env(doc).items() if k.startswith("FINSTREAM_")}
    for name, ref in secret_env(doc).items():
        if not ref.get("optional"):
            env[name] = "stand-in-secret"
    for name in list(env):
        if name.endswith("_FCM_SERVICE_ACCOUNT_FILE"):
            env[name] = str(files["FCM"])
        elif name.endswith("_APNS_KEY_FILE"):
            env[name] = str(files["APNS"])
        elif name.endswith("_MD_REPLAY_PATH"):
            env[name] = str(files["REPLAY"])
        elif name.startswith("FINSTREAM_KAFKA_SSL_") and name.endswith("_FILE"):
            env.pop(name)  # mounted from the cluster's Secrets
    fields = {k.removeprefix("FINSTREAM_").lower(): v for k, v in env.items()}
    fields.pop("kafka_security_protocol", None)
    for key in [k for k in fields if k.startswith("kafka_sasl")]:
        fields.pop(key)
    return Settings(**fields)


# -- roles that could not start are not deployed ---------------------------------------------


def test_every_deployed_provider_role_can_build_its_chain(
    renders: dict[str, Render], provider_files: dict[str, Path]
) -> None:
    from finstream.connectors.registry import build, chain_specs
    from finstream.sinks.delivery.base import build_chain

    checked = 0
    for render in renders.values():
        for dep in render.of_kind("Deployment"):
            role = role_of(dep)
            if role in PROVIDER_ROLES:
                settings = settings_of(dep, provider_files)
                chain = build_chain(settings, PROVIDER_ROLES[role])
                assert chain, f"{render.name}: {role} deployed without a provider"
                checked += 1
            elif role in MARKET_ROLES:
                settings = settings_of(dep, provider_files)
                if role == "simulator":
                    assert settings.synthetic_market_refusal({"simulated"}) is None, render.name
                    continue
                # Raises (the role's own start-up check) on synthetic prices in production.
                specs = chain_specs(settings)
                names = list(dict.fromkeys(p for s in specs for p in s.providers))
                connectors, _ = build(settings, names, [s for spec in specs for s in spec.symbols])
                usable = [n for n, c in connectors.items() if not c.configuration_problem()]
                assert usable, f"{render.name}: connector deployed with no usable provider"
                checked += 1
    assert checked >= 10


def notes(tools: Tools, tmp_path: Path, *args: str) -> str:
    """NOTES.txt as `helm install` prints it (rendered here through a copy of the chart)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart, symlinks=False)
    (chart / "NOTES.copy").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "notes-render.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ tpl (.Files.Get "NOTES.copy") . | toJson }}\n'
    )
    proc = subprocess.run(
        [
            str(tools.helm),
            "template",
            RELEASE,
            str(chart),
            "--namespace",
            NAMESPACE,
            "--kube-version",
            tools.kube_version,
            "--set",
            f"image.digest={DIGEST}",
            "--show-only",
            "templates/notes-render.yaml",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return str(yaml.safe_load(proc.stdout)["data"]["notes"])


@pytest.mark.parametrize(
    ("overlay", "left_out"),
    [
        (None, {"connector", "delivery-email", "delivery-push", "delivery-sms"}),
        ("values-dev.yaml", {"delivery-email", "delivery-push", "delivery-sms"}),
        ("values-prod.yaml", set()),
    ],
    ids=["values.yaml", "values-dev.yaml", "values-prod.yaml"],
)
def test_roles_left_out_are_named_in_notes_and_not_deployed(
    tools: Tools,
    renders: dict[str, Render],
    tmp_path: Path,
    overlay: str | None,
    left_out: set[str],
) -> None:
    args = ("-f", str(CHART / overlay)) if overlay else ()
    text = notes(tools, tmp_path, *args)
    named = set(re.findall(r"^NOT DEPLOYED: ([a-z-]+): ", text, re.MULTILINE))
    assert named == left_out, text
    render = renders[
        {None: "default", "values-dev.yaml": "dev", "values-prod.yaml": "prod"}[overlay]
    ]
    deployed = {role_of(d) for d in render.of_kind("Deployment")}
    assert not deployed & left_out
    if "connector" in left_out:
        assert "simulated (synthetic prices, refused in production" in text
    if "delivery-sms" in left_out:
        assert "twilio needs FINSTREAM_DELIVERY_TWILIO_ACCOUNT_SID" in text


def test_an_optional_secret_does_not_count_as_a_configured_provider(tools: Tools) -> None:
    from .conftest import helm_template

    proc = helm_template(
        tools,
        "--set",
        "workers.delivery-email.secrets.FINSTREAM_DELIVERY_SENDGRID_API_KEY.key=k",
        "--set",
        "workers.delivery-email.secrets.FINSTREAM_DELIVERY_SENDGRID_API_KEY.optional=true",
    )
    assert proc.returncode == 0, proc.stderr
    assert "fs-finstream-delivery-email\n" not in proc.stdout
    required = helm_template(
        tools,
        "--set",
        "workers.delivery-email.secrets.FINSTREAM_DELIVERY_SENDGRID_API_KEY.key=k",
    )
    assert "name: fs-finstream-delivery-email\n" in required.stdout


def _needs_table() -> dict[str, list[str]]:
    text = (CHART / "templates" / "_providers.tpl").read_text()
    block = text.split('define "finstream.providerNeeds"', 1)[1].split("{{- end }}", 1)[0]
    return {
        name: re.findall(r'"([A-Z0-9_|]+)"', needs)
        for name, needs in re.findall(r'"([a-z-]+)" \(list([^)]*)\)', block)
    }


def test_the_charts_provider_table_matches_the_providers(provider_files: dict[str, Path]) -> None:
    """Exactly the variables the chart requires make each delivery provider configured."""
    import importlib

    from finstream.connectors.registry import PROVIDERS
    from finstream.sinks.delivery.base import REGISTRY

    table = _needs_table()
    assert set(REGISTRY) - {"inbox"} <= set(table)
    assert set(PROVIDERS) <= set(table)
    fields = set(Settings.model_fields)
    for needs in table.values():
        for alternatives in needs:
            for name in alternatives.split("|"):
                assert name.removeprefix("FINSTREAM_").lower() in fields, name

    def value(name: str) -> str:
        if name.endswith("_FILE"):
            return str(provider_files["FCM" if "FCM" in name else "APNS"])
        return "x"

    for provider in set(REGISTRY) - {"inbox"}:
        module, _, attr = REGISTRY[provider].partition(":")
        create = getattr(importlib.import_module(module), attr)
        chosen = {n.split("|")[0]: value(n.split("|")[0]) for n in table[provider]}
        settings = Settings(**{k.removeprefix("FINSTREAM_").lower(): v for k, v in chosen.items()})
        assert create(settings) is not None, provider
        for missing in chosen:
            rest = {k: v for k, v in chosen.items() if k != missing}
            try:
                partial = create(
                    Settings(**{k.removeprefix("FINSTREAM_").lower(): v for k, v in rest.items()})
                )
            except ValueError:
                partial = None  # refuses to start: also "not configured" for the chart
            assert partial is None, f"{provider} works without {missing}"


def test_image_defaults_to_production() -> None:
    text = (ROOT / "Dockerfile").read_text()
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^\s+FINSTREAM_ENV=production \\$", runtime, re.MULTILINE)
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    # The Compose demo is the one place that says dev, for its simulated market.
    assert compose["x-finstream-env"]["FINSTREAM_ENV"] == "dev"


# -- Kafka: every client is its own Strimzi KafkaUser, with the ACLs its work needs ----------


def test_prod_roles_connect_over_sasl_ssl_as_their_own_kafka_users(
    renders: dict[str, Render],
) -> None:
    prod = renders["prod"]
    users = {u["metadata"]["name"]: u for u in prod.of_kind("KafkaUser")}
    deployments = prod.of_kind("Deployment")
    assert {f"finstream-{role_of(d)}" for d in deployments} == set(users)
    for dep in deployments:
        role = role_of(dep)
        env, secrets = plain_env(dep), secret_env(dep)
        user = f"finstream-{role}"
        assert env["FINSTREAM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL", role
        assert env["FINSTREAM_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512", role
        assert env["FINSTREAM_KAFKA_SASL_USERNAME"] == user
        # Strimzi's User Operator writes the password to the Secret named after the user.
        assert secrets["FINSTREAM_KAFKA_SASL_PASSWORD"] == {"name": user, "key": "password"}
        ca = env["FINSTREAM_KAFKA_SSL_CA_FILE"]
        mounts = {m["mountPath"]: m["name"] for m in container(dep)["volumeMounts"]}
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        volume = volumes[mounts[str(Path(ca).parent)]]
        assert volume["secret"]["secretName"] == "kafka-cluster-ca-cert"
        spec = users[user]["spec"]
        assert spec["authentication"] == {"type": "scram-sha-512"}
        assert users[user]["metadata"]["labels"]["strimzi.io/cluster"] == "kafka"
        acls = spec["authorization"]["acls"]
        allowed = {
            (a["resource"]["type"], a["resource"].get("name"), op)
            for a in acls
            for op in a["operations"]
        }
        group = Settings().group(role)
        for topic in ROLES[role].inputs:
            assert ("topic", topic, "Read") in allowed, (role, topic)
        if ROLES[role].inputs:
            assert ("group", group, "Read") in allowed, role
        stream = ROLES[role].kind == "stream"
        # <group>-<store>-changelog topics and <group>-<instance id> transactional ids.
        assert (("topic", f"{group}-", "Create") in allowed) is stream, role
        assert (("transactionalId", f"{group}-", "Write") in allowed) is stream, role
        for a in acls:
            if a["resource"]["type"] in ("transactionalId", "group") or a["resource"].get(
                "name", ""
            ).endswith("-"):
                assert a["resource"]["patternType"] == "prefix", (role, a)
        assert not any("All" in a["operations"] for a in acls), role


def test_stream_acls_name_what_the_engine_uses() -> None:
    """The prefixes granted are the engine's own names for changelogs and transactional ids."""
    runtime = ROOT / "src" / "finstream" / "runtime"
    engine = "".join(
        f.read_text() for f in [runtime / "engine.py", *sorted((runtime / "stream").glob("*.py"))]
    )
    assert 'return f"{self.group}-{self.instance_id}"' in engine
    assert "-changelog" in engine
    assert 'f"{self.group}-restore"' in engine


def test_keda_reads_lag_as_each_role_with_the_same_security(renders: dict[str, Render]) -> None:
    prod = renders["prod"]
    (auth,) = prod.of_kind("TriggerAuthentication")
    by_param = {e["parameter"]: e for e in auth["spec"]["env"]}
    assert by_param["username"]["name"] == "FINSTREAM_KAFKA_SASL_USERNAME"
    assert by_param["password"]["name"] == "FINSTREAM_KAFKA_SASL_PASSWORD"
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "ca", "name": "kafka-cluster-ca-cert", "key": "ca.crt"}
    ]
    deployments = {d["metadata"]["name"]: d for d in prod.of_kind("Deployment")}
    for scaled in prod.of_kind("ScaledObject"):
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        names = {e["name"] for e in container(target)["env"]}
        assert container(target)["name"] == by_param["username"]["containerName"]
        assert {"FINSTREAM_KAFKA_SASL_USERNAME", "FINSTREAM_KAFKA_SASL_PASSWORD"} <= names
        for trigger in scaled["spec"]["triggers"]:
            if trigger["type"] == "kafka":
                assert trigger["metadata"]["sasl"] == "scram_sha512"
                assert trigger["metadata"]["tls"] == "enable"
                assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


# -- egress: only the delivery roles, the connector and the API (SNS) leave the cluster -----


def _reaches(policies: list[dict[str, Any]], labels: dict[str, str], ip: str, port: int) -> bool:
    applying = [
        p
        for p in policies
        if "Egress" in p["spec"]["policyTypes"]
        and all(labels.get(k) == v for k, v in p["spec"]["podSelector"]["matchLabels"].items())
    ]
    assert applying, labels
    address = ipaddress.ip_address(ip)
    for policy in applying:
        for rule in policy["spec"].get("egress", []):
            if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
                continue
            for peer in rule.get("to") or [{"ipBlock": {"cidr": "0.0.0.0/0"}}]:
                block = peer.get("ipBlock")
                if block is None:
                    continue
                inside = address in ipaddress.ip_network(block["cidr"])
                if inside and not any(
                    address in ipaddress.ip_network(x) for x in block.get("except", [])
                ):
                    return True
    return False


@pytest.mark.parametrize("name", ["default", "prod"])
def test_only_delivery_roles_and_the_connector_reach_outside(
    renders: dict[str, Render], name: str
) -> None:
    render = renders[name]
    policies = render.of_kind("NetworkPolicy")
    ports = {"delivery-email": {443, 587, 465}, "delivery-push": {443, 2197}}
    outside = set()
    for dep in render.of_kind("Deployment"):
        role = role_of(dep)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        for port in (443, 587, 465, 2197, 80):
            if _reaches(policies, labels, PUBLIC_IP, port):
                outside.add(role)
                assert port in ports.get(role, {443}), (role, port)
        # Nobody reaches a private address through a provider rule.
        assert not _reaches(policies, labels, "10.1.2.3", 443), role
    deployed = {role_of(d) for d in render.of_kind("Deployment")}
    callers = {"delivery-email", "delivery-push", "delivery-sms", "connector", "api"}
    assert outside == deployed & callers
    if name == "prod":
        assert outside == callers


def test_cilium_mode_allows_providers_by_name(renders: dict[str, Render]) -> None:
    mesh = renders["prod-mesh"]
    policies = {role_of(p): p for p in mesh.of_kind("CiliumNetworkPolicy")}
    assert set(policies) == {"delivery-email", "delivery-push", "delivery-sms", "connector", "api"}
    names = {
        role: {
            f.get("matchName") or f.get("matchPattern") for f in p["spec"]["egress"][1]["toFQDNs"]
        }
        for role, p in policies.items()
    }
    assert "api.twilio.com" in names["delivery-sms"]
    assert "api.sendgrid.com" in names["delivery-email"]
    assert "fcm.googleapis.com" in names["delivery-push"]
    assert "finnhub.io" in names["connector"]
    assert names["api"] == {"sns.*.amazonaws.com"}
    assert not names["delivery-sms"] & names["connector"]
    for p in policies.values():
        dns = p["spec"]["egress"][0]
        assert dns["toPorts"][0]["rules"]["dns"] == [{"matchPattern": "*"}]
    # The CIDR rules step aside for them; the common policy stays.
    provider_np = [
        p for p in mesh.of_kind("NetworkPolicy") if p["metadata"]["name"].endswith("-providers")
    ]
    assert provider_np == []
    assert any(
        p["metadata"]["name"] == f"{RELEASE}-finstream" for p in mesh.of_kind("NetworkPolicy")
    )


def test_istio_mode_is_strict_and_authorizes_each_role(renders: dict[str, Render]) -> None:
    mesh = renders["prod-mesh"]
    assert renders["prod"].of_kind("AuthorizationPolicy") == []
    (peer,) = mesh.of_kind("PeerAuthentication")
    assert peer["spec"]["mtls"] == {"mode": "STRICT"}
    assert peer["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    assert peer["spec"]["portLevelMtls"] == {"8081": {"mode": "PERMISSIVE"}}
    policies = {role_of(p): p for p in mesh.of_kind("AuthorizationPolicy")}
    deployments = {role_of(d): d for d in mesh.of_kind("Deployment")}
    assert set(policies) == set(deployments)
    for role, policy in policies.items():
        spec = policy["spec"]
        assert spec["action"] == "ALLOW"
        assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == role
        ops = [to["operation"] for rule in spec["rules"] for to in rule["to"]]
        scrape = {
            "ports": ["8081"],
            "methods": ["GET"],
            "paths": ["/metrics", "/healthz", "/readyz"],
        }
        if role == "api":
            assert ops == [scrape, {"ports": ["8000"]}]
        else:
            # Workers accept only Prometheus' scrapes (and probes) on the metrics port.
            assert ops == [scrape], role
