"""A private Toxiproxy for fault tests: network faults between our code and a real server.

:class:`Toxiproxy` starts ``toxiproxy-server`` (built by ``make tools`` into
``.tools/bin``) on a free loopback port and drives it through its HTTP API
(https://github.com/Shopify/toxiproxy#http-api) with httpx. A test creates a
:class:`Proxy` in front of a real server (a provider fake, the shared
PostgreSQL or Redis), points the code under test at ``proxy.url`` / its
``host:port``, and adds toxics:

* ``latency``      every chunk delayed by ``latency`` ms (± ``jitter``);
* ``bandwidth``    at most ``rate`` KB/s;
* ``timeout``      a half-open connection: data stops flowing, the connection
                   stays open (``timeout`` 0), or is closed after that many ms;
* ``reset_peer``   the connection is reset (TCP RST) after ``timeout`` ms;
* ``limit_data``   the connection is closed after ``bytes`` bytes;
* ``slicer``, ``slow_close``: as documented upstream.

``stream`` is ``downstream`` (server to client) or ``upstream`` (client to
server). Every proxy and toxic is removed when the server stops; the shared
services behind the proxies are never touched.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.services import REPO, free_port

TOOLS_ENV = REPO / ".tools" / "deploy-tools.env"


def server_binary() -> Path:
    """toxiproxy-server from `make tools`; a missing one fails the test with how to get it."""
    values: dict[str, str] = {}
    if TOOLS_ENV.exists():
        values = dict(
            line.split("=", 1) for line in TOOLS_ENV.read_text().splitlines() if "=" in line
        )
    path = Path(values.get("TOXIPROXY_SERVER", REPO / ".tools" / "bin" / "toxiproxy-server"))
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make tools` (deploy/tools/install.sh)")
    return path


@dataclass
class Proxy:
    api: httpx.Client
    name: str
    listen: str  # host:port the proxy listens on
    upstream: str

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        """http://host:port of the proxy (for HTTP upstreams)."""
        return f"http://{self.listen}"

    def add(
        self,
        kind: str,
        name: str | None = None,
        stream: str = "downstream",
        toxicity: float = 1.0,
        **attributes: Any,
    ) -> str:
        """Add a toxic; returns its name (for :meth:`remove`)."""
        toxic = name or f"{kind}_{stream}"
        r = self.api.post(
            f"/proxies/{self.name}/toxics",
            json={
                "name": toxic,
                "type": kind,
                "stream": stream,
                "toxicity": toxicity,
                "attributes": attributes,
            },
        )
        r.raise_for_status()
        return toxic

    def remove(self, toxic: str) -> None:
        self.api.delete(f"/proxies/{self.name}/toxics/{toxic}").raise_for_status()

    def clear(self) -> None:
        """Remove every toxic of this proxy."""
        for toxic in self.api.get(f"/proxies/{self.name}/toxics").json():
            self.remove(toxic["name"])

    def enable(self, enabled: bool = True) -> None:
        """Disabled: the proxy closes every connection and refuses new ones."""
        self.api.post(f"/proxies/{self.name}", json={"enabled": enabled}).raise_for_status()

    @contextlib.contextmanager
    def toxic(self, kind: str, **kwargs: Any) -> Iterator[str]:
        name = self.add(kind, **kwargs)
        try:
            yield name
        finally:
            self.remove(name)


class Toxiproxy:
    """A toxiproxy-server of this test's own, on a free port."""

    def __init__(self, log_dir: Path | None = None) -> None:
        self.port = free_port()
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        self._log_dir = log_dir
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Toxiproxy:
        log = (
            (self._log_dir / f"toxiproxy-{self.port}.log").open("ab")
            if self._log_dir
            else subprocess.DEVNULL
        )
        self._proc = subprocess.Popen(
            [str(server_binary()), "-host", "127.0.0.1", "-port", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        if not isinstance(log, int):
            log.close()
        deadline = time.monotonic() + 30
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"toxiproxy-server exited with {self._proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if self.api.get("/version").status_code == 200:
                    break
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("toxiproxy-server did not answer within 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.api.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def proxy(self, name: str, upstream: str) -> Proxy:
        """A proxy to ``upstream`` (host:port) on a free loopback port."""
        r = self.api.post(
            "/proxies",
            json={"name": name, "listen": f"127.0.0.1:{free_port()}", "upstream": upstream},
        )
        r.raise_for_status()
        body = r.json()
        return Proxy(self.api, name, body["listen"], body["upstream"])

    def reset(self) -> None:
        """Every proxy enabled again and every toxic removed."""
        self.api.post("/reset").raise_for_status()
