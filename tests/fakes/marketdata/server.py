"""Running fake providers: in the test's event loop, or in a thread of their own.

Async tests use :func:`serve` (an async context manager yielding the base
URL). Integration tests that drive worker subprocesses and wait with the
synchronous ``wait_until`` use :class:`FakeThread`, whose event loop keeps
answering while the test thread sleeps. Fakes are plain objects with a
``mode`` attribute; setting it from the test thread is a single attribute
store, which the GIL makes safe.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

from aiohttp import web


class Fake(Protocol):
    def app(self) -> web.Application: ...


@asynccontextmanager
async def serve(fake: Fake) -> AsyncIterator[str]:
    runner = web.AppRunner(fake.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server: Any = site._server  # aiohttp has no public accessor for the bound port
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class FakeThread:
    """Fakes served from a background thread's event loop."""

    def __init__(self, *fakes: Fake) -> None:
        self.fakes = fakes
        self.urls: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runners: list[web.AppRunner] = []

    def __enter__(self) -> FakeThread:
        self._thread.start()
        self.urls = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> list[str]:
        urls = []
        for fake in self.fakes:
            runner = web.AppRunner(fake.app(), access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            server: Any = site._server
            urls.append(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
            self._runners.append(runner)
        return urls

    async def _stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
