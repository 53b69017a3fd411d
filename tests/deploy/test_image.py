"""The container image and the Compose demo, checked without a Docker engine.

No engine runs here, so the Dockerfile cannot be built in tests; hadolint and
checkov lint it (test_chart.py), and these tests check what a build would
trip over: every file a stage copies exists and is not excluded from the build
context, the base image is pinned by digest, the runtime stage is hardened,
and the image's hash-locked requirements are the runtime part of
requirements.lock. deploy/compose.yaml is validated against the Compose
specification's own JSON schema and checked to run every worker role.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml

from finstream.roles import ROLES

from .conftest import ROOT, Tools

DIGEST_REF = re.compile(r"^[a-z0-9./_-]+:[\w.-]+@sha256:[a-f0-9]{64}$")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    result = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def stages() -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for word, rest in instructions():
        if word == "FROM":
            current = rest.split()[-1]
            found[current] = []
        found[current].append((word, rest))
    return found


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for the build context: a path is out if it or a parent matches."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatch(
                candidate.rsplit("/", 1)[-1], pattern[3:]
            ):
                return True
    return False


def pins(path: Path) -> dict[str, str]:
    found = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", path.read_text(), re.MULTILINE)
    return {name.lower().replace("_", "-"): version for name, version in found}


def test_stages_copy_files_that_exist_in_the_context() -> None:
    patterns = dockerignore()
    copied = 0
    for stage, body in stages().items():
        for word, rest in body:
            if word not in ("COPY", "ADD"):
                continue
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            if "--from=" in rest:
                continue
            for source in args[:-1]:
                copied += 1
                assert (ROOT / source).exists(), f"{stage}: COPY {source}: no such file"
                if source != ".":
                    assert not ignored(source, patterns), f"{stage}: {source} is .dockerignored"
    assert copied >= 4


def test_wheel_inputs_reach_the_build_stage() -> None:
    """`COPY . /src` brings what the wheel build reads: nothing of it may be .dockerignored."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    hatch = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = ["pyproject.toml", project["project"]["readme"], *hatch["packages"]]
    needed += list(hatch.get("force-include", {}))
    patterns = dockerignore()
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not ignored(path, patterns), f"{path} is needed by the wheel but .dockerignored"
    # And the local state that must never reach an image is kept out.
    for path in (".venv", ".tools", ".stack", ".git", "tests", ".env"):
        assert ignored(path, patterns), path


def test_base_image_pinned_and_runtime_hardened() -> None:
    all_stages = stages()
    (base_ref,) = [rest.split()[0] for word, rest in instructions() if word == "FROM"][:1]
    assert DIGEST_REF.match(base_ref), base_ref
    assert base_ref.startswith("python:3.11-slim-bookworm@sha256:")
    froms = [rest for word, rest in instructions() if word == "FROM"]
    # One pinned base; the other stages build on it by name.
    assert all(f.split()[0] in ("base", base_ref) for f in froms), froms
    runtime = dict(all_stages)["runtime"]
    words = [w for w, _ in runtime]
    assert list(all_stages)[-1] == "runtime"
    user = next(rest for w, rest in runtime if w == "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), user
    assert int(uid) >= 10000, user
    assert gid.isdigit(), user
    entrypoint = json.loads(next(rest for w, rest in runtime if w == "ENTRYPOINT"))
    assert entrypoint == ["/usr/bin/tini", "--", "finstream"]
    assert "HEALTHCHECK" in words
    healthcheck = next(rest for w, rest in runtime if w == "HEALTHCHECK")
    assert "finstream-healthcheck" in healthcheck
    volumes = json.loads(next(rest for w, rest in runtime if w == "VOLUME"))
    assert set(volumes) == {"/tmp", "/var/lib/finstream"}
    env = " ".join(rest for w, rest in runtime if w == "ENV")
    assert "FINSTREAM_STACK_DIR=/var/lib/finstream/" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    build = dict(all_stages)["build"]
    run = " ".join(rest for w, rest in build if w == "RUN")
    assert "--require-hashes" in run
    assert "--only-binary=:all:" in run


def test_image_lock_is_the_runtime_part_of_requirements_lock() -> None:
    image = pins(ROOT / "deploy" / "image" / "requirements.txt")
    dev = pins(ROOT / "requirements.lock")
    text = (ROOT / "deploy" / "image" / "requirements.txt").read_text()
    assert text.count("--hash=sha256:") >= len(image)
    drift = {n: (v, dev.get(n)) for n, v in image.items() if dev.get(n) != v}
    assert not drift, f"image lock differs from requirements.lock (run `make lock`): {drift}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in image, f"{name} (pyproject) missing from deploy/image/requirements.txt"
    for dev_only in ("pytest", "mypy", "ruff", "hypothesis"):
        assert dev_only not in image


def test_healthcheck_script_reports_up_and_down(tmp_path: Path) -> None:
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    script = str(ROOT / "deploy" / "image" / "healthcheck.py")
    try:
        up = subprocess.run(
            [sys.executable, script, f"{base}/healthz"], capture_output=True, check=False
        )
        down = subprocess.run(
            [sys.executable, script, f"{base}/readyz"], capture_output=True, check=False
        )
        default = subprocess.run(
            [sys.executable, script],
            capture_output=True,
            check=False,
            env={"FINSTREAM_HTTP_PORT": str(server.server_port)},
        )
    finally:
        server.shutdown()
    assert up.returncode == 0
    assert default.returncode == 0
    assert down.returncode == 1
    assert b"HTTP 503" in down.stderr


# -- compose -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    return doc


def compose_errors(tools: Tools, doc: dict[str, Any]) -> list[str]:
    schema = json.loads((tools.schemas / "compose-spec.json").read_text())
    return [str(e) for e in jsonschema_rs.validator_for(schema).iter_errors(doc)]


def test_compose_matches_the_compose_specification(tools: Tools, compose: dict[str, Any]) -> None:
    assert compose_errors(tools, compose) == []
    broken = json.loads(json.dumps(compose))
    broken["services"]["quotes"]["comand"] = ["worker", "quotes"]
    assert compose_errors(tools, broken), "the schema check must catch a misspelt key"


def test_compose_runs_every_role_on_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    workers = {
        s["command"][1]: name
        for name, s in services.items()
        if s.get("command", [None])[0] == "worker"
    }
    # The simulated feed runs under `finstream run` (demo request, progress lines).
    feed = services["feed"]["command"]
    assert feed[:2] == ["run", "--no-prepare"]
    assert feed[feed.index("--roles") + 1] == "simulator"
    missing = set(ROLES) - set(workers) - {"simulator"}
    assert not missing, f"deploy/compose.yaml: add a service `worker <role>` for {sorted(missing)}"
    assert set(workers) | {"simulator"} == set(ROLES)
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        if service.get("image") == "finstream:dev":
            assert service["read_only"] is True, name
            assert service["cap_drop"] == ["ALL"], name
            assert service["user"] == "10001:10001", name
    for backing in ("kafka", "postgres", "redis", "mailpit"):
        assert backing in services
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["topics"]["build"]["dockerfile"] == "Dockerfile"
    assert (ROOT / "deploy" / services["topics"]["build"]["context"] / "Dockerfile").exists()


def test_compose_settings_exist(compose: dict[str, Any]) -> None:
    from finstream.settings import Settings

    known = {f"FINSTREAM_{name.upper()}" for name in Settings.model_fields}
    # Read by the image's healthcheck script, not by finstream.
    known.add("FINSTREAM_HEALTHCHECK_URL")
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        used = {k for k in env if k.startswith("FINSTREAM_")}
        assert used - known == set(), name
