"""Offline JSON schemas for kubeconform (run by deploy/tools/install.sh).

``kubernetes``: copies one Kubernetes version's strict schemas out of the
kubernetes-validate package. Its schemas point at a shared
``/api/_definitions.json`` by absolute URL path; kubeconform resolves a
``$ref`` against the schema file's own location, so the references are made
relative (``_definitions.json#/...``) and the ``$id`` dropped. The folder is
named as kubeconform's default template expects:
``v<version>-standalone-strict/<kind>-<group>-<version>.json``.

``crds``: turns CustomResourceDefinition YAML into one JSON schema per served
version at ``<group>/<kind>_<version>.json`` (kubeconform's
``{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}`` template), the way
the API server would judge a custom resource: objects with declared
properties reject unknown ones unless ``x-kubernetes-preserve-unknown-fields``
says otherwise, ``nullable`` allows null, int-or-string allows both, and
``apiVersion``/``kind`` must name this very resource.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml


def kubernetes(version: str, out: Path) -> int:
    import kubernetes_validate

    src = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    folder = src / f"v{version}-local-strict"
    if not folder.is_dir():
        have = sorted(p.name for p in src.iterdir() if p.name.endswith("-local-strict"))
        sys.exit(f"kubernetes-validate has no schemas for {version}; it has {have}")
    dest = out / f"v{version}-standalone-strict"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    count = 0
    for path in folder.glob("*.json"):
        doc = json.loads(path.read_text())
        doc.pop("$id", None)
        text = json.dumps(doc).replace('"/api/_definitions.json#', '"_definitions.json#')
        if '"/api/' in text:
            sys.exit(f"{path.name}: a $ref this script does not know how to localise")
        (dest / path.name).write_text(text)
        count += 1
    print(f"kubernetes {version}: {count} schemas in {dest}")
    return count


_BRANCHES = ("anyOf", "oneOf", "allOf", "not")


def _strict(node: Any, branch: bool = False) -> Any:
    # Inside anyOf/oneOf/allOf/not a structural schema only constrains (e.g.
    # Cilium's "one of ingress, egress, ..."); the API server prunes by the
    # properties outside them, so closing a branch would reject valid objects.
    if isinstance(node, list):
        return [_strict(n, branch) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _strict(v, branch or k in _BRANCHES) for k, v in node.items()}
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in node and "additionalProperties" not in node and not preserve and not branch:
        node["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string") is True and "anyOf" not in node:
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") is True and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    return node


def crd_schemas(crd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"<group>/<kind>_<version>.json": schema}`` for each served version of one CRD."""
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    result: dict[str, dict[str, Any]] = {}
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            continue
        schema = _strict(schema)
        props = schema.setdefault("properties", {})
        props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        props["kind"] = {"type": "string", "enum": [kind]}
        # metadata is the API server's ObjectMeta, not described by CRDs.
        props["metadata"] = {"type": "object"}
        schema["additionalProperties"] = False
        result[f"{group}/{kind.lower()}_{version['name']}.json"] = schema
    return result


def crds(out: Path, files: list[Path]) -> int:
    count = 0
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            for name, schema in crd_schemas(doc).items():
                dest = out / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(json.dumps(schema, indent=1))
                print(f"crd schema {name}")
                count += 1
    if count == 0:
        sys.exit("no CustomResourceDefinition with a schema found")
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kubernetes")
    k.add_argument("--version", required=True)
    k.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("crds")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    if args.what == "kubernetes":
        kubernetes(args.version, args.out)
    else:
        crds(args.out, args.files)


if __name__ == "__main__":
    main()
