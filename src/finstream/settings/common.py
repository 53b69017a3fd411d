"""What the settings groups share: the repository root and path normalization."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def default_stack_dir() -> Path:
    return REPO_ROOT / ".stack"


def absolute(value: Path | None) -> Path | None:
    """A path setting made absolute (``~`` expanded), so a child in another folder reads it alike."""
    return value.expanduser().resolve() if value is not None else None
