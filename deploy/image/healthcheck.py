#!/usr/local/bin/python3
"""finstream-healthcheck: exit 0 when every URL answers HTTP 200, else 1.

The image's HEALTHCHECK runs it with no argument: it then checks
$FINSTREAM_HEALTHCHECK_URL, or the worker's /healthz on $FINSTREAM_HTTP_PORT
(the API container sets FINSTREAM_HEALTHCHECK_URL to its own port). The Helm
test pod runs it with the API's and each worker's URLs and some retries.
Standard library only, so that it starts in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request


def check(url: str, timeout: float) -> str | None:
    """None when the URL answers 200; otherwise why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http only)
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return str(exc)


def main() -> int:
    parser = argparse.ArgumentParser(prog="finstream-healthcheck")
    parser.add_argument("urls", nargs="*")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--retries", type=int, default=0, help="extra attempts per URL")
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    urls = args.urls or [
        os.environ.get("FINSTREAM_HEALTHCHECK_URL")
        or f"http://127.0.0.1:{os.environ.get('FINSTREAM_HTTP_PORT', '8081')}/healthz"
    ]
    failed = False
    for url in urls:
        for attempt in range(args.retries + 1):
            problem = check(url, args.timeout)
            if problem is None:
                print(f"ok   {url}")
                break
            if attempt == args.retries:
                print(f"FAIL {url}: {problem}", file=sys.stderr)
                failed = True
            else:
                time.sleep(args.interval)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
