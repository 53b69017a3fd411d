"""The Helm chart: lint, schema validation, policy scan, and the scaling rules.

Every overlay is rendered (tests/deploy/conftest.py), validated by kubeconform
in strict mode against offline schemas (Kubernetes, KEDA, Strimzi, Prometheus
operator) and scanned by checkov. Then the properties operators rely on are
asserted on the rendered objects: one autoscaler per role and never two, a
lag-scaled role's maximum within its topics' partitions, no fixed replicas
when autoscaling, hardened pods, secrets by reference, and the chart's worker
list in step with src/finstream/roles.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from finstream.roles import ROLES
from finstream.topics import load_catalogue

from .conftest import (
    CHART,
    DIGEST,
    NAMESPACE,
    OPERATOR_APIS,
    RELEASE,
    ROOT,
    Render,
    Tools,
    helm_template,
)

OVERLAYS = [None, "values-dev.yaml", "values-staging.yaml", "values-prod.yaml"]
AUTOSCALED = ["staging", "staging-operators", "prod", "prod-hpa"]
SCALERS = ("ScaledObject", "HorizontalPodAutoscaler")
POD_OWNERS = ("Deployment", "Job", "Pod", "CronJob")


def values(overlay: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((CHART / (overlay or "values.yaml")).read_text())
    return doc


def role_of(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def partitions(topic: str) -> int:
    return load_catalogue().get(topic).partitions


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return pod_spec({"kind": "Job", "spec": doc["spec"]["jobTemplate"]["spec"]})
    spec: dict[str, Any] = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
    return spec


# -- the tools' verdicts ----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda o: o or "values.yaml")
def test_helm_lint_strict(tools: Tools, overlay: str | None) -> None:
    cmd = [str(tools.helm), "lint", "--strict", str(CHART), "--kube-version", tools.kube_version]
    cmd += ["--set", f"image.digest={DIGEST}"]
    if overlay:
        cmd += ["-f", str(CHART / overlay)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_kubeconform_strict_with_offline_schemas(tools: Tools, renders: dict[str, Render]) -> None:
    schemas = tools.schemas
    proc = subprocess.run(
        [
            str(tools.kubeconform),
            "-strict",
            "-summary",
            "-output",
            "json",
            "-kubernetes-version",
            tools.kube_version,
            # Offline only: a kind without a schema here is an error, not a download.
            "-schema-location",
            f"{schemas}/kubernetes/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
            "-schema-location",
            f"{schemas}/crds/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
            *[str(r.path) for r in renders.values()],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = json.loads(proc.stdout)
    problems = [r for r in report["resources"] if r["status"] != "statusValid"]
    assert not problems, json.dumps(problems, indent=1)
    assert proc.returncode == 0, proc.stderr
    summary = report["summary"]
    assert summary["invalid"] == summary["errors"] == summary["skipped"] == 0
    kinds = {d["kind"] for r in renders.values() for d in r.docs}
    # The operator resources were really validated, not just the core ones.
    assert {"ScaledObject", "KafkaTopic", "ServiceMonitor", "PrometheusRule"} <= kinds
    assert summary["valid"] == sum(len(r.docs) for r in renders.values())


def test_kubeconform_rejects_what_the_api_server_would(tools: Tools, tmp_path: Path) -> None:
    """The offline schemas are strict: unknown fields and wrong types fail, also in CRDs."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata: {name: a}\n"
        "spec: {scaleTargetRef: {name: a}, maxReplicaCount: 3, maxReplicas: 3, triggers: []}\n"
        "---\napiVersion: kafka.strimzi.io/v1beta2\nkind: KafkaTopic\nmetadata: {name: b}\n"
        "spec: {partitions: many}\n"
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: c}\n"
        "spec: {selector: {}, template: {spec: {containers: [{name: c, image: i, port: 1}]}}}\n"
    )
    proc = subprocess.run(
        [
            str(tools.kubeconform),
            "-strict",
            "-output",
            "json",
            "-kubernetes-version",
            tools.kube_version,
            "-schema-location",
            f"{tools.schemas}/kubernetes/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
            "-schema-location",
            f"{tools.schemas}/crds/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    statuses = {r["kind"]: r["status"] for r in json.loads(proc.stdout)["resources"]}
    assert statuses == {
        "ScaledObject": "statusInvalid",
        "KafkaTopic": "statusInvalid",
        "Deployment": "statusInvalid",
    }


# checkov rules skipped for every render, each with the reason:
CHECKOV_SKIPS = {
    # Secrets as environment variables: finstream reads every setting, secrets
    # included, from FINSTREAM_* variables (src/finstream/settings/). The chart
    # only references Secrets (secretKeyRef; never a value in a manifest), the
    # logs redact them (runtime/logging.py), and secrets that providers want as
    # files (APNs key, FCM account) are mounted as files (secrets.mounts).
    "CKV_K8S_35",
}


def test_checkov_policies(tools: Tools, renders: dict[str, Render], tmp_path: Path) -> None:
    for render in renders.values():
        (tmp_path / render.path.name).write_text(render.path.read_text())
    (tmp_path / "Dockerfile").write_text((ROOT / "Dockerfile").read_text())
    proc = subprocess.run(
        [
            str(tools.checkov),
            "--directory",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-check",
            ",".join(sorted(CHECKOV_SKIPS)),
            "--skip-download",
            "--output",
            "json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, proc.stderr
    failed = [
        f"{f['check_id']} {f['check_name']}: {f['resource']} ({Path(f['file_path']).name})"
        for r in reports
        for f in r["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert all(r["summary"]["passed"] > 0 for r in reports)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_dockerfile(tools: Tools) -> None:
    proc = subprocess.run(
        [str(tools.hadolint), "--format", "json", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(proc.stdout) == [], proc.stdout
    assert proc.returncode == 0, proc.stderr


# -- scaling -------------------------------------------------------------------------


@pytest.mark.parametrize("name", AUTOSCALED)
def test_autoscaling_one_scaler_per_role_within_partitions(
    renders: dict[str, Render], name: str
) -> None:
    render = renders[name]
    deployments = {role_of(d): d for d in render.of_kind("Deployment")}
    scalers: dict[str, list[dict[str, Any]]] = {}
    for kind in SCALERS:
        for s in render.of_kind(kind):
            scalers.setdefault(s["spec"]["scaleTargetRef"]["name"], []).append(s)
    assert set(deployments) <= set(ROLES)
    for role, dep in deployments.items():
        spec = ROLES[role]
        found = scalers.get(dep["metadata"]["name"], [])
        mode = dep["metadata"]["labels"]["finstream.io/scaling"]
        if mode == "singleton":
            # A feed: exactly one, never two during a rollout, never autoscaled.
            assert dep["spec"]["replicas"] == 1, role
            assert dep["spec"]["strategy"]["type"] == "Recreate", role
            assert found == [], role
            continue
        assert len(found) == 1, f"{role}: {len(found)} autoscalers"
        assert "replicas" not in dep["spec"], f"{role}: fixed replicas while autoscaled"
        scaler = found[0]
        if scaler["kind"] == "ScaledObject":
            low, high = scaler["spec"]["minReplicaCount"], scaler["spec"]["maxReplicaCount"]
        else:
            low, high = scaler["spec"]["minReplicas"], scaler["spec"]["maxReplicas"]
        assert 1 <= low <= high, role
        if mode == "lag":
            assert spec.inputs, role
            assert high <= min(partitions(t) for t in spec.inputs), role
            if scaler["kind"] == "ScaledObject":
                env = {e["name"]: e.get("value") for e in pod_spec(dep)["containers"][0]["env"]}
                prefix = env["FINSTREAM_NAMESPACE"]
                triggers = scaler["spec"]["triggers"]
                assert {t["metadata"]["topic"] for t in triggers} == {
                    prefix + t for t in spec.inputs
                }
                assert {t["metadata"]["consumerGroup"] for t in triggers} == {
                    f"{prefix}finstream-{role}"
                }
                assert all(t["type"] == "kafka" for t in triggers)
        behavior = (
            scaler["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            if scaler["kind"] == "ScaledObject"
            else scaler["spec"]["behavior"]
        )
        # Rebalances are costly: scale-down waits.
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300, role


def test_keda_engine_gives_a_scaled_object_to_every_scalable_role(
    renders: dict[str, Render],
) -> None:
    prod = renders["prod"]
    assert prod.of_kind("HorizontalPodAutoscaler") == []
    scalable = {
        role_of(d)
        for d in prod.of_kind("Deployment")
        if d["metadata"]["labels"]["finstream.io/scaling"] != "singleton"
    }
    assert {role_of(s) for s in prod.of_kind("ScaledObject")} == scalable
    lag_roles = {r for r in scalable if ROLES[r].inputs}
    assert lag_roles == {name for name, spec in ROLES.items() if spec.inputs}
    # Without KEDA the same roles get CPU HPAs instead, and no ScaledObject.
    plain = renders["staging"]
    assert plain.of_kind("ScaledObject") == []
    assert {role_of(s) for s in plain.of_kind("HorizontalPodAutoscaler")} == {
        role_of(d)
        for d in plain.of_kind("Deployment")
        if d["metadata"]["labels"]["finstream.io/scaling"] != "singleton"
    }


def test_autoscaling_off_gives_fixed_replicas(renders: dict[str, Render]) -> None:
    dev = renders["dev"]
    assert not any(dev.of_kind(k) for k in SCALERS)
    for dep in dev.of_kind("Deployment"):
        assert dep["spec"]["replicas"] >= 1, role_of(dep)


def test_maximum_above_partitions_is_capped(tools: Tools) -> None:
    proc = helm_template(
        tools,
        "--set",
        "workers.quotes.autoscaling.maxReplicas=50",
        overlay="values-prod.yaml",
        apis=OPERATOR_APIS,
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    so = next(d for d in docs if d["kind"] == "ScaledObject" and role_of(d) == "quotes")
    assert so["spec"]["maxReplicaCount"] == partitions("md.ticks")


def test_templates_dir_is_a_configmap_mounted_into_every_worker(
    tools: Tools, tmp_path: Path
) -> None:
    """templates.files becomes a ConfigMap (keys without "/"), mounted by path into every
    worker with FINSTREAM_TEMPLATES_DIR pointing at it; without files, nothing of it."""
    source = '{% extends "_layouts/email.j2" %}{% block subject %}{{ symbol }}{% endblock %}'
    overlay = tmp_path / "templates.yaml"
    overlay.write_text(
        yaml.safe_dump({"templates": {"files": {"price_alert/email.it.j2": source}}})
    )
    proc = helm_template(tools, "-f", str(overlay))
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (cm,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-templates")
    ]
    assert cm["data"] == {"price_alert__email.it.j2": source}
    workers = [d for d in docs if d["kind"] == "Deployment"]
    assert workers
    for d in workers:
        spec = pod_spec(d)
        (volume,) = [v for v in spec["volumes"] if v["name"] == "templates"]
        assert volume["configMap"]["items"] == [
            {"key": "price_alert__email.it.j2", "path": "price_alert/email.it.j2"}
        ]
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mount = next(m for m in container["volumeMounts"] if m["name"] == "templates")
        assert env["FINSTREAM_TEMPLATES_DIR"] == mount["mountPath"]
        assert "subPath" not in mount  # a subPath mount would never see an update
    plain = helm_template(tools)
    assert "FINSTREAM_TEMPLATES_DIR" not in plain.stdout


# -- values and the role registry --------------------------------------------------


def worker_entry(name: str) -> str:
    """A values.yaml entry for a role of roles.py, to paste when a role is added."""
    spec = ROLES[name]
    scaling = "lag" if spec.inputs else "singleton"
    autoscaling = (
        "{enabled: true, minReplicas: 1, lagThreshold: 1000}"
        if spec.inputs
        else ("{enabled: false}")
    )
    return (
        f"  {name}:\n    enabled: true\n    kind: {spec.kind}\n"
        f"    inputs: [{', '.join(spec.inputs)}]\n"
        f"    description: {json.dumps(spec.description)}\n    scaling: {scaling}\n"
        f"    replicas: 1\n    startupSeconds: {300 if spec.kind == 'stream' else 60}\n"
        "    resources:\n      requests: {cpu: 100m, memory: 192Mi}\n"
        "      limits: {cpu: 500m, memory: 384Mi}\n"
        f"    autoscaling: {autoscaling}\n    env: {{}}\n"
    )


def test_chart_workers_match_roles_py() -> None:
    """values.yaml `workers:` lists exactly the roles of src/finstream/roles.py."""
    workers = values()["workers"]
    missing = sorted(set(ROLES) - set(workers))
    extra = sorted(set(workers) - set(ROLES))
    hint = (
        f"helm/finstream/values.yaml `workers:` is out of step with roles.py: remove {extra}, "
        "add (then tune resources and scaling):\n" + "".join(worker_entry(n) for n in missing)
    )
    assert not missing, hint
    assert not extra, hint
    for name, spec in ROLES.items():
        w = workers[name]
        assert w["kind"] == spec.kind, name
        assert tuple(w["inputs"]) == spec.inputs, name
        for topic in spec.inputs:
            load_catalogue().get(topic)  # raises for a topic topics.yaml lacks
        if spec.inputs:
            assert w["scaling"] in ("lag", "singleton"), name
        else:
            assert w["scaling"] in ("cpu", "singleton"), name
    for overlay in OVERLAYS[1:]:
        assert set(values(overlay).get("workers", {})) <= set(ROLES), overlay


def test_chart_topics_are_the_catalogue() -> None:
    """files/topics.yaml is the repository's topics.yaml (a link), not a copy that drifts."""
    link = CHART / "files" / "topics.yaml"
    assert link.is_symlink()
    assert link.resolve() == (ROOT / "topics.yaml").resolve()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "replicaCount=3"), "additional properties 'replicaCount' not allowed"),
        (
            ("--set", "workers.quotes.replicaz=3"),
            "additional properties 'replicaz' not allowed",
        ),
        (("--set", "autoscaling.engine=magic"), "autoscaling/engine"),
        (("--set", "secrets.env.DATABASE_URL.key=x"), "DATABASE_URL"),
        (("--set", "image.digest=latest"), "image/digest"),
    ],
)
def test_values_schema_rejects_unknown_and_wrong_keys(
    tools: Tools, args: tuple[str, ...], message: str
) -> None:
    proc = helm_template(tools, *args)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "workers.api.scaling=lag"), "workers.api reads no topic"),
        (
            ("--set", "workers.connector.autoscaling.enabled=true"),
            "workers.connector is a singleton",
        ),
        (("--set", "workers.history.inputs={md.tickz}"), 'reads "md.tickz"'),
        (
            ("--set", "config.extraEnv.FINSTREAM_REDIS_URL=redis://x"),
            "FINSTREAM_REDIS_URL is set both as a plain value and from a Secret",
        ),
    ],
)
def test_chart_refuses_inconsistent_values(
    tools: Tools, args: tuple[str, ...], message: str
) -> None:
    proc = helm_template(tools, *args)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_prod_refuses_an_image_without_digest(tools: Tools) -> None:
    proc = helm_template(tools, overlay="values-prod.yaml", apis=OPERATOR_APIS, digest=None)
    assert proc.returncode != 0
    assert "image.digest is required" in proc.stderr
    ok = helm_template(tools, overlay="values-prod.yaml", apis=OPERATOR_APIS)
    assert f"image: finstream@{DIGEST}" in ok.stdout


# -- pods -------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY$|DATABASE_URL|REDIS_URL|CIPHER_PASS)")


def test_every_pod_is_hardened(renders: dict[str, Render]) -> None:
    for render in renders.values():
        for doc in (d for d in render.docs if d["kind"] in POD_OWNERS):
            where = f"{render.name}: {doc['kind']} {doc['metadata']['name']}"
            pod = pod_spec(doc)
            assert pod["automountServiceAccountToken"] is False, where
            psc = pod["securityContext"]
            assert psc["runAsNonRoot"] is True, where
            assert psc["runAsUser"] >= 10000, where
            assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                assert c["resources"]["requests"], where
                assert c["resources"]["limits"], where
                assert c["image"].endswith(DIGEST), where
                mounts = {m["mountPath"] for m in c["volumeMounts"]}
                assert {"/tmp", "/var/lib/finstream"} <= mounts, where
                for env in c.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "value" not in env, f"{where}: {env['name']} inlined"
                        assert "secretKeyRef" in env["valueFrom"], where


def test_workers_have_probes_budgets_and_graceful_stop(renders: dict[str, Render]) -> None:
    for render in renders.values():
        pdbs = {p["metadata"]["name"] for p in render.of_kind("PodDisruptionBudget")}
        services = {s["metadata"]["name"] for s in render.of_kind("Service")}
        for dep in render.of_kind("Deployment"):
            name = dep["metadata"]["name"]
            role = role_of(dep)
            pod = pod_spec(dep)
            (c,) = pod["containers"]
            assert c["args"] == ["worker", role]
            assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
            if ROLES[role].kind == "stream":
                assert budget >= 120, f"{name}: {budget}s to restore state"
            assert pod["terminationGracePeriodSeconds"] >= 30
            assert name in services
            if render.name != "dev":
                assert name in pdbs
                keys = {t["topologyKey"] for t in pod["topologySpreadConstraints"]}
                assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
            env = {e["name"]: e for e in c["env"]}
            assert env["FINSTREAM_HTTP_HOST"]["value"] == "0.0.0.0"
            # Each replica's transactional id is its pod name (a restarted
            # container fences its predecessor at once).
            assert env["FINSTREAM_INSTANCE_ID"]["valueFrom"]["fieldRef"] == {
                "fieldPath": "metadata.name"
            }


def test_network_policy_limits_ingress_to_metrics_and_api(renders: dict[str, Render]) -> None:
    prod = renders["prod"]
    policies = {p["metadata"]["name"]: p for p in prod.of_kind("NetworkPolicy")}
    main = policies[f"{RELEASE}-finstream"]
    assert main["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ingress_ports = {p["port"] for rule in main["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {values()["workerPort"]}
    egress_ports = {p["port"] for rule in main["spec"]["egress"] for p in rule["ports"]}
    assert {53, 9093, 5432, 6379} <= egress_ports
    # Provider ports only for the roles that call providers (test_chart_production.py).
    assert 443 not in egress_ports
    api = policies[f"{RELEASE}-finstream-api"]
    assert {p["port"] for rule in api["spec"]["ingress"] for p in rule["ports"]} == {8000}


def test_topics_and_migrations_as_code(renders: dict[str, Render]) -> None:
    catalogue = load_catalogue()
    topics = {t["spec"]["topicName"]: t for t in renders["prod"].of_kind("KafkaTopic")}
    assert set(topics) == set(catalogue.names)
    for spec in catalogue.topics:
        kt = topics[spec.name]
        assert kt["spec"]["partitions"] == spec.partitions
        assert kt["spec"]["config"] == spec.configs(
            values("values-prod.yaml")["topics"]["replicationFactor"]
        )
        assert kt["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert kt["metadata"]["labels"]["strimzi.io/cluster"] == "kafka"
    staging_ns = values("values-staging.yaml")["config"]["namespace"]
    staged = renders["staging-operators"].of_kind("KafkaTopic")
    assert {t["spec"]["topicName"] for t in staged} == {staging_ns + n for n in catalogue.names}
    # Without Strimzi: a hook Job applies topics.yaml, then one migrates the database.
    jobs = {role_of(j): j for j in renders["staging"].of_kind("Job")}
    assert pod_spec(jobs["topics"])["containers"][0]["args"][:2] == ["topics", "apply"]
    assert pod_spec(jobs["migrate"])["containers"][0]["args"] == ["db", "migrate"]
    weights = {r: int(j["metadata"]["annotations"]["helm.sh/hook-weight"]) for r, j in jobs.items()}
    assert weights["topics"] < weights["migrate"]
    for j in jobs.values():
        assert j["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert renders["prod"].of_kind("Job")[0]["metadata"]["name"].endswith("migrate")


def test_monitoring_resources(renders: dict[str, Render]) -> None:
    prod = renders["prod"]
    (sm,) = prod.of_kind("ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "http-metrics"
    # finstream.rules, and the operations group of issue 15 in a resource of its own.
    alerts = {
        r["alert"]
        for rule in prod.of_kind("PrometheusRule")
        for g in rule["spec"]["groups"]
        for r in g["rules"]
    }
    assert {
        "FinstreamDatabaseBackupLate",
        "FinstreamWalArchivingFailing",
        "FinstreamDatabaseConnectionsHigh",
        "FinstreamDatabaseReplicationLag",
        "FinstreamRetentionFailed",
        "FinstreamConsumerLagHigh",
        "FinstreamConsumerStalled",
        "FinstreamDeadLettersGrowing",
        "FinstreamDeliverySuccessLow",
        "FinstreamDeliveryCircuitOpen",
        "FinstreamMarketDataCircuitOpen",
    } <= alerts
    (dashboards,) = prod.of_kind("ConfigMap")
    for text in dashboards["data"].values():
        json.loads(text)
    assert {
        "finstream.json",
        "finstream-database.json",
        "finstream-notifications.json",
        "finstream-privacy.json",
    } <= set(dashboards["data"])
    # A cluster without the Prometheus operator gets neither (and no render error).
    assert renders["staging"].of_kind("ServiceMonitor") == []


def stalled_rule(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (alert,) = [
        r
        for d in docs
        if d["kind"] == "PrometheusRule"
        for g in d["spec"]["groups"]
        for r in g["rules"]
        if r.get("alert") == "FinstreamConsumerStalled"
    ]
    return alert


def test_stalled_consumer_alert_watches_the_stall_gauge_with_its_values(
    tools: Tools, renders: dict[str, Render]
) -> None:
    """A role that commits nothing while records wait pages (its /readyz is red
    already): the default threshold is the workers' own (FINSTREAM_STREAM_STALL_SECONDS,
    120 s), and both knobs reach the rule. tests/e2e/test_stalled_consumer.py fires it."""
    alert = stalled_rule(renders["prod"].docs)
    assert alert["expr"].startswith("max by (role) (finstream_stream_stalled_seconds{namespace=")
    assert alert["expr"].endswith("> 120")
    assert alert["for"] == "5m"
    assert alert["labels"]["severity"] == "critical"
    proc = helm_template(
        tools,
        "--set",
        "metrics.prometheusRule.stallSeconds=30",
        "--set",
        "metrics.prometheusRule.stallFor=1m",
        overlay="values-prod.yaml",
        apis=OPERATOR_APIS,
    )
    assert proc.returncode == 0, proc.stderr
    alert = stalled_rule([d for d in yaml.safe_load_all(proc.stdout) if d])
    assert alert["expr"].endswith("> 30")
    assert alert["for"] == "1m"


def test_helm_test_hook_checks_the_api(renders: dict[str, Render]) -> None:
    (pod,) = renders["prod"].of_kind("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    assert c["command"][0] == "finstream-healthcheck"
    assert f"http://{RELEASE}-finstream-api:8000/healthz" in c["args"]


def promql_queries(render: Render) -> list[str]:
    queries = [
        r["expr"]
        for rule in render.of_kind("PrometheusRule")
        for g in rule["spec"]["groups"]
        for r in g["rules"]
    ]
    (dashboards,) = render.of_kind("ConfigMap")
    for text in dashboards["data"].values():
        for panel in json.loads(text)["panels"]:
            # Grafana fills these in before Prometheus sees the query.
            queries += [
                t["expr"].replace("$__rate_interval", "5m").replace("$namespace", "finstream")
                for t in panel["targets"]
            ]
    return queries


def test_alert_and_dashboard_queries_parse_and_use_real_metrics(
    tools: Tools, renders: dict[str, Render]
) -> None:
    queries = promql_queries(renders["prod"])
    check = (
        "import json, sys, promql_parser\n"
        "bad = []\n"
        "for q in json.load(sys.stdin):\n"
        "    try:\n"
        "        promql_parser.parse(q)\n"
        "    except ValueError as exc:\n"
        "        bad.append(f'{q}: {exc}')\n"
        "print(json.dumps(bad))\n"
    )
    proc = subprocess.run(
        [str(tools.python), "-c", check],
        input=json.dumps([*queries, "sum by (role (broken"]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    bad = json.loads(proc.stdout)
    assert bad[-1].startswith("sum by (role (broken"), "the parser must reject bad PromQL"
    assert bad[:-1] == [], "\n".join(bad)
    # Every finstream metric a query names is one the code defines.
    defined = set()
    for path in (ROOT / "src" / "finstream").rglob("*.py"):
        defined |= set(re.findall(r'"(finstream_[a-z0-9_]+)"', path.read_text()))
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m)
        for q in queries
        for m in re.findall(r"\b(finstream_[a-z0-9_]+)\b", q)
    }
    assert used - defined == set(), f"queries name metrics no code defines: {used - defined}"


def test_every_rendered_setting_exists(renders: dict[str, Render]) -> None:
    """A misspelt FINSTREAM_* variable would be ignored by pydantic-settings: catch it here."""
    from finstream.settings import Settings

    known = {f"FINSTREAM_{name.upper()}" for name in Settings.model_fields}
    for render in renders.values():
        for doc in (d for d in render.docs if d["kind"] in POD_OWNERS):
            for c in pod_spec(doc)["containers"]:
                # pgBackRest reads its own PGBACKREST_* options (backup CronJobs).
                names = {
                    e["name"] for e in c.get("env", []) if not e["name"].startswith("PGBACKREST_")
                }
                assert names - known == set(), f"{render.name} {doc['metadata']['name']}"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert not selector.get("matchExpressions"), "extend _selects for matchExpressions"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_admits(peer: dict[str, Any], labels: dict[str, str], ns: dict[str, str]) -> bool:
    if "ipBlock" in peer:
        return False  # pod-to-pod traffic here
    if "namespaceSelector" in peer:
        in_ns = _selects(peer["namespaceSelector"], ns)
        return in_ns and _selects(peer.get("podSelector", {}), labels)
    return ns.get("kubernetes.io/metadata.name") == NAMESPACE and _selects(
        peer["podSelector"], labels
    )


def _allowed(
    policies: list[dict[str, Any]],
    direction: str,
    pod: dict[str, str],
    peer: dict[str, str],
    peer_ns: dict[str, str],
    port: int,
) -> bool:
    kind, key = ("Ingress", "from") if direction == "ingress" else ("Egress", "to")
    applying = [
        p
        for p in policies
        if kind in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod)
    ]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get(direction, []):
            ports = rule.get("ports")
            if ports and port not in [p["port"] for p in ports]:
                continue
            peers = rule.get(key)
            if not peers or any(_peer_admits(x, peer, peer_ns) for x in peers):
                return True
    return False


def test_network_policies_let_the_helm_test_through_and_strangers_not(
    renders: dict[str, Render],
) -> None:
    prod = renders["prod"]
    policies = prod.of_kind("NetworkPolicy")
    here = {"kubernetes.io/metadata.name": NAMESPACE}
    elsewhere = {"kubernetes.io/metadata.name": "someone-else"}
    (test_pod,) = prod.of_kind("Pod")
    tester = test_pod["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in prod.of_kind("Service")}
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in prod.of_kind("Deployment")}
    checked = 0
    for url in test_pod["spec"]["containers"][0]["args"]:
        match = re.match(r"http://([^:/]+):(\d+)/", url)
        assert match, url
        host, port = match.groups()
        service = services[host]
        (target,) = [p["targetPort"] for p in service["spec"]["ports"] if p["port"] == int(port)]
        template = pods[host]
        (container_port,) = [
            p["containerPort"]
            for p in template["spec"]["containers"][0]["ports"]
            if p["name"] == target
        ]
        dest = template["metadata"]["labels"]
        assert _allowed(policies, "egress", tester, dest, here, container_port), url
        assert _allowed(policies, "ingress", dest, tester, here, container_port), url
        # A pod of another namespace reaches neither metrics nor the API.
        assert not _allowed(policies, "ingress", dest, {"app": "x"}, elsewhere, container_port)
        checked += 1
    assert checked == len([d for d in prod.of_kind("Deployment")]) + 1
    # Prometheus in the monitoring namespace scrapes every role.
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    for template in pods.values():
        labels = template["metadata"]["labels"]
        assert _allowed(policies, "ingress", labels, {"app": "prometheus"}, monitoring, 8081)


# -- least privilege and database operations ------------------------------------------------


def _secret_refs(container: dict[str, Any]) -> dict[str, str]:
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


@pytest.mark.parametrize("name", ["default", "prod"])
def test_each_role_gets_only_its_own_credentials(renders: dict[str, Render], name: str) -> None:
    from finstream.db.grants import WORKER_DB_ROLES

    render = renders[name]
    database_keys = {}
    for dep in render.of_kind("Deployment"):
        role = role_of(dep)
        refs = _secret_refs(pod_spec(dep)["containers"][0])
        if role in WORKER_DB_ROLES:
            database_keys[role] = refs["FINSTREAM_DATABASE_URL"]
        else:
            assert "FINSTREAM_DATABASE_URL" not in refs, (
                f"{role} holds a database login it never uses"
            )
        if name == "prod":
            twilio = {"FINSTREAM_DELIVERY_TWILIO_AUTH_TOKEN", "FINSTREAM_API_TWILIO_AUTH_TOKEN"}
            if role not in ("delivery-sms", "api"):
                assert not twilio & set(refs), f"{role} holds the Twilio token"
            if role != "delivery-email":
                assert "FINSTREAM_DELIVERY_SENDGRID_API_KEY" not in refs, role
            if role != "connector":
                assert not {"FINSTREAM_MD_FINNHUB_KEY", "FINSTREAM_MD_POLYGON_KEY"} & set(refs), (
                    role
                )
    # One login per group role; only retention (and the jobs) use the owner's.
    assert database_keys["history"] == "database-url-history"
    assert database_keys["api"] == "database-url-api"
    assert database_keys["retention"] == "database-url-owner"
    owners = {r for r, k in database_keys.items() if k == "database-url-owner"}
    assert owners == {"retention"}
    # delivery-sms is deployed only where Twilio is configured (prod; issue 15).
    present = [r for r in ("history", "bars", "audit", "api", "delivery-sms") if r in database_keys]
    assert len({database_keys[r] for r in present}) == len(present) >= 4 + (name == "prod")
    for job in render.of_kind("Job"):
        refs = _secret_refs(pod_spec(job)["containers"][0])
        if role_of(job) == "migrate":
            assert refs["FINSTREAM_DATABASE_URL"] == "database-url-owner"
        else:
            assert "FINSTREAM_DATABASE_URL" not in refs, role_of(job)


def test_backup_and_retention_cronjobs(renders: dict[str, Render]) -> None:
    prod = renders["prod"]
    jobs = {role_of(c): c for c in prod.of_kind("CronJob")}
    assert set(jobs) == {"backup-full", "backup-incr", "retention"}
    for role, job in jobs.items():
        assert job["spec"]["concurrencyPolicy"] == "Forbid"
        c = pod_spec(job)["containers"][0]
        assert _secret_refs(c)["FINSTREAM_DATABASE_URL"] == "database-url-owner"
        if role.startswith("backup-"):
            assert c["args"] == ["db", "backup", "--type", role.removeprefix("backup-")]
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["PGBACKREST_REPO1_TYPE"] == "s3"
            assert "PGBACKREST_REPO1_S3_KEY_SECRET" in _secret_refs(c)
        else:
            assert c["args"] == ["db", "retention"]
    assert jobs["backup-full"]["spec"]["schedule"] == "0 1 * * *"
    assert jobs["backup-incr"]["spec"]["schedule"] == "30 * * * *"
