"""No module in src/ grows past 500 lines (issue 17 split the last ones)."""

from __future__ import annotations

from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
LIMIT = 500


def test_no_module_in_src_exceeds_500_lines() -> None:
    lines = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    over = {name: n for name, n in lines.items() if n > LIMIT}
    assert not over, f"split these modules (at most {LIMIT} lines): {over}"
