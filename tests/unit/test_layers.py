"""The package's layering, read from its imports.

domain ← codec/topics/settings ← runtime ← connectors/sinks/stores ← agents ← api/cli:
a module may import its own layer and the layers below it, never one above.
Imports inside functions count too: a lazy import still couples the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "finstream"

# Top-level modules and packages of finstream, by layer (0 is the bottom).
LAYERS: dict[str, int] = {
    # pure logic and packaged files
    "domain": 0,
    "resources": 0,
    # the edge's vocabulary: wire formats, topic contracts, configuration, the role list
    "codec": 1,
    "codec_writers": 1,
    "topics": 1,
    "settings": 1,
    "roles": 1,
    # the stream engine, Kafka clients, logging, metrics, the worker process
    "runtime": 2,
    # the outside world: providers, writers, read models, the database's operations,
    # the local stack and the provider sandboxes
    "connectors": 3,
    "sinks": 3,
    "stores": 3,
    "db": 3,
    "stack": 3,
    "stack_security": 3,
    "sandbox": 3,
    # users' data keys, erasure, export, verification (issue 14)
    "privacy": 3,
    # each stream role's wiring
    "agents": 4,
    # entry points, and the test harness that drives them (testing/ also holds the
    # in-memory twin of the delivery store: it implements sinks' store port, so it sits above sinks)
    "api": 5,
    "cli": 5,
    "testing": 5,
    "__init__": 5,
}


def _top(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "finstream":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "finstream":
                found.extend((node.lineno, f"finstream.{a.name}") for a in node.names)
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
    return found


def _owner(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


def test_every_top_level_module_has_a_layer() -> None:
    tops = {_owner(p) for p in PACKAGE.rglob("*.py")}
    missing = sorted(tops - set(LAYERS))
    assert not missing, f"give these a layer in tests/unit/test_layers.py: {missing}"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        owner = _owner(path)
        if owner not in LAYERS:
            continue
        for line, module in _imports(path):
            target = _top(module)
            if target is None or target == owner or target not in LAYERS:
                continue
            if LAYERS[target] > LAYERS[owner]:
                violations.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} ({owner}, layer {LAYERS[owner]})"
                    f" imports {module} (layer {LAYERS[target]})"
                )
    assert not violations, "\n".join(violations)


def test_the_domain_imports_no_io_client() -> None:
    io_modules = {"asyncpg", "redis", "confluent_kafka", "httpx", "aiohttp", "websockets", "socket"}
    offenders = []
    for path in (PACKAGE / "domain").rglob("*.py"):
        for line, module in _imports(path):
            if module.split(".")[0] in io_modules:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)
