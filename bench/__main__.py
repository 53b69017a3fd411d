"""Run every benchmark (or the named ones), each in its own process."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    wanted = argv or names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        print(f"unknown benchmarks {unknown}; known: {names}", file=sys.stderr)
        return 2
    print(
        f"# machine: {platform.node()} {platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}, {_cpus()} cpus"
    )
    failed = []
    for name in wanted:
        print(f"\n## {name}", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, "-m", f"bench.bench_{name}"], cwd=HERE.parent)
        print(f"({name}: {time.monotonic() - started:.0f}s, exit {code})", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"\nfailed: {failed}", file=sys.stderr)
    return 1 if failed else 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
