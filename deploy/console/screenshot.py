"""A screenshot of the console of a running `make run`, for the README.

    make run                                     # in another terminal; wait a few minutes
    .venv/bin/python deploy/console/screenshot.py [--url http://127.0.0.1:8000/console/]
                                                 [--out docs/console.png] [--symbol AAPL]

Drives Debian's chromium with Playwright (no browser download), waits until
quotes tick, bars are drawn, the inbox and the journeys have entries and
the status panel is filled, selects a journey, and writes the PNG. Exits 1
with the reason (and any browser console error) when the page is not there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/console/")
    parser.add_argument("--out", default="docs/console.png")
    parser.add_argument("--symbol", default=None, help="Chart this symbol (default: the first).")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    errors: list[str] = []
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=args.chromium,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1250},
        )
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(args.url)
            page.wait_for_selector("#ws-state.ok", timeout=30_000)
            if args.symbol:
                page.click(f"#q-{args.symbol}")
            page.wait_for_function(
                "document.querySelectorAll('#inbox li').length > 0"
                " && document.querySelectorAll('#journeys li').length > 0"
                " && document.querySelectorAll('#status tbody tr').length > 0",
                timeout=60_000,
            )
            # The status panel's events/s needs two samples (it refreshes every 5 s).
            page.wait_for_function(
                "[...document.querySelectorAll('#status tbody td:nth-child(4)')]"
                ".some(td => td.textContent !== '-')",
                timeout=30_000,
            )
            page.click("#journeys li")
            page.wait_for_selector("#journey .step", timeout=15_000)
            page.wait_for_timeout(1500)  # a few more ticks on the chart
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
        except Exception as exc:
            print(f"error: {exc}", file=sys.stderr)
            for e in errors:
                print(f"browser console: {e}", file=sys.stderr)
            return 1
        finally:
            context.close()
    if errors:
        for e in errors:
            print(f"browser console: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
