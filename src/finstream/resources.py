"""Where the project's data files live, in a checkout and in an installed wheel.

A checkout reads them from the repository root (so edits take effect at once);
a wheel carries them under ``finstream/_data`` (see pyproject's force-include).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DATA = Path(__file__).resolve().parent / "_data"
_REPO_ROOT = Path(__file__).resolve().parents[2]

_REPO_LOCATIONS = {
    "schemas": _REPO_ROOT / "schemas",
    "migrations": _REPO_ROOT / "migrations",
    "topics.yaml": _REPO_ROOT / "topics.yaml",
    "kafka": _REPO_ROOT / "deploy" / "kafka",
    "templates": _REPO_ROOT / "templates",
}


def resource(name: str) -> Path:
    """Path of a named data file or folder (schemas, migrations, topics.yaml, kafka, templates)."""
    repo = _REPO_LOCATIONS.get(name)
    if repo is not None and repo.exists():
        return repo
    packaged = _PACKAGE_DATA / name
    if packaged.exists():
        return packaged
    raise FileNotFoundError(f"finstream data {name!r} not found in {repo} or {packaged}")
