"""Fixtures for the deployment checks: the tools `make tools` installs, and renders of the chart.

Nothing here needs Kafka, PostgreSQL or Redis. The tools live in .tools/
(deploy/tools/install.sh); a missing tool fails the test with the command that
installs it, never skips it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "finstream"
TOOLS_ENV = ROOT / ".tools" / "deploy-tools.env"
NAMESPACE = "finstream"
RELEASE = "fs"
# What a deployment pipeline passes: the digest of the image CI built.
DIGEST = "sha256:" + "5e" * 32
# What a cluster with KEDA, the Prometheus operator and Strimzi serves.
OPERATOR_APIS = (
    "keda.sh/v1alpha1/ScaledObject",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
    "kafka.strimzi.io/v1beta2/KafkaTopic",
)


@dataclass(frozen=True)
class Tools:
    kube_version: str
    helm: Path
    kubeconform: Path
    checkov: Path
    hadolint: Path
    schemas: Path
    python: Path


@pytest.fixture(scope="session")
def tools() -> Tools:
    if not TOOLS_ENV.exists():
        pytest.fail(f"{TOOLS_ENV} is missing: run `make tools` (deploy/tools/install.sh)")
    values = dict(line.split("=", 1) for line in TOOLS_ENV.read_text().splitlines() if "=" in line)
    found = Tools(
        kube_version=values["KUBE_VERSION"],
        helm=Path(values["HELM"]),
        kubeconform=Path(values["KUBECONFORM"]),
        checkov=Path(values["CHECKOV"]),
        hadolint=Path(values["HADOLINT"]),
        schemas=Path(values["SCHEMAS"]),
        python=Path(values["PYTHON"]),
    )
    for path in (found.helm, found.kubeconform, found.checkov, found.hadolint, found.python):
        if not path.exists():
            pytest.fail(f"{path} is missing: run `make tools`")
    return found


@dataclass
class Render:
    """One `helm template` of the chart: the manifest text and its documents."""

    name: str
    path: Path
    docs: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        for d in self.of_kind(kind):
            if d["metadata"]["name"] == name:
                return d
        raise AssertionError(f"{self.name}: no {kind} {name}")


def helm_template(
    tools: Tools,
    *args: str,
    overlay: str | None = None,
    apis: tuple[str, ...] = (),
    digest: str | None = DIGEST,
) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(tools.helm),
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        tools.kube_version,
    ]
    if overlay:
        cmd += ["-f", str(CHART / overlay)]
    if digest:
        cmd += ["--set", f"image.digest={digest}"]
    for api in apis:
        cmd += ["--api-versions", api]
    cmd += list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


# name: (overlay, cluster APIs, extra args)
RENDERS: dict[str, tuple[str | None, tuple[str, ...], tuple[str, ...]]] = {
    "default": (None, (), ()),
    "dev": ("values-dev.yaml", (), ()),
    # A plain cluster: CPU HPAs and the topics Job.
    "staging": ("values-staging.yaml", (), ()),
    "staging-operators": ("values-staging.yaml", OPERATOR_APIS, ()),
    "prod": ("values-prod.yaml", OPERATOR_APIS, ()),
    "prod-hpa": ("values-prod.yaml", OPERATOR_APIS, ("--set", "autoscaling.engine=hpa")),
    # issue 15: the optional Istio mode and Cilium FQDN egress.
    "prod-mesh": (
        "values-prod.yaml",
        OPERATOR_APIS,
        ("--set", "istio.enabled=true", "--set", "networkPolicy.cilium.enabled=true"),
    ),
}


@pytest.fixture(scope="session")
def renders(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Render]:
    out = tmp_path_factory.mktemp("renders")
    result: dict[str, Render] = {}
    for name, (overlay, apis, extra) in RENDERS.items():
        proc = helm_template(tools, *extra, overlay=overlay, apis=apis)
        assert proc.returncode == 0, f"helm template ({name}) failed:\n{proc.stderr}"
        path = out / f"{name}.yaml"
        path.write_text(proc.stdout)
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert docs, f"helm template ({name}) rendered nothing"
        result[name] = Render(name, path, docs)
    return result
