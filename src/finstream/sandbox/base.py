"""What every provider sandbox (and test fake) shares: fault switches, acceptance
records, a background runner."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

# Fault kinds every fake understands (each answers them in its own format):
#   ok           accept
#   throttle     the provider's 429 with its Retry-After / rate-limit headers
#   error        the provider's 5xx
#   auth         the provider's 401/403
#   timeout      answer nothing for `hang` seconds, then 503; the message is NOT taken
#   accept_hang  take the message, then answer nothing for `hang` seconds
#   drop         close the connection without an answer; the message is NOT taken
FAULTS = ("ok", "throttle", "error", "auth", "timeout", "accept_hang", "drop")


@dataclass
class Faults:
    """What the next requests get: a script first, then the mode, then random errors."""

    mode: str = "ok"
    error_rate: float = 0.0
    error_kind: str = "error"
    hang: float = 3.0
    latency: float = 0.0  # added to every answer (a slow provider)
    retry_after: float = 1.0
    seed: int = 7
    script: deque[str] = field(default_factory=deque)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def then(self, *kinds: str) -> Faults:
        for kind in kinds:
            if kind not in FAULTS:
                raise ValueError(f"unknown fault {kind!r}")
        self.script.extend(kinds)
        return self

    def next(self) -> str:
        if self.script:
            return self.script.popleft()
        if self.mode != "ok":
            return self.mode
        if self.error_rate and self._rng.random() < self.error_rate:
            return self.error_kind
        return "ok"

    def reset(self) -> None:
        self.mode = "ok"
        self.error_rate = 0.0
        self.latency = 0.0
        self.script.clear()


class Recorder:
    """What a fake took, by the sender's message id (each entry stamped with ``at``).

    ``keep`` bounds the history (the long-running sandbox keeps the latest
    ones); tests keep everything.
    """

    def __init__(self, keep: int | None = None) -> None:
        self.keep = keep
        self.accepted: list[dict[str, Any]] = []
        self.requests = 0
        self.faults_served: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, message_id: str | None, **details: Any) -> dict[str, Any]:
        entry = {"message_id": message_id, "at": time.time(), **details}
        with self._lock:
            self.accepted.append(entry)
            if self.keep is not None and len(self.accepted) > self.keep:
                del self.accepted[: len(self.accepted) - self.keep]
        return entry

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(str(e["message_id"]) for e in self.accepted)

    def ids(self) -> set[str]:
        return set(self.counts())

    def duplicates(self) -> dict[str, int]:
        return {k: v for k, v in self.counts().items() if v > 1}


class Fake(Protocol):
    recorder: Recorder
    faults: Faults

    async def start(self) -> str:
        """Start serving on 127.0.0.1 (a free port); return the base URL."""

    async def stop(self) -> None: ...


class HttpFake(abc.ABC):
    """An aiohttp-served fake; each provider's fake builds its routes in ``app``."""

    def __init__(self) -> None:
        self.recorder = Recorder()
        self.faults = Faults()
        self.url = ""
        self._runner: web.AppRunner | None = None

    @abc.abstractmethod
    def app(self) -> web.Application: ...

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server  # aiohttp has no public accessor for the bound port
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def fault(self, request: web.Request) -> str:
        """Draw the fault for this request; 'timeout' and 'drop' are handled here."""
        self.recorder.requests += 1
        kind = self.faults.next()
        self.recorder.faults_served[kind] += 1
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        if kind == "timeout":
            await asyncio.sleep(self.faults.hang)
        elif kind == "drop":
            transport = request.transport
            if transport is not None:
                transport.abort()
            raise asyncio.CancelledError
        return kind


class FakeThread:
    """Fakes served from a background thread's event loop.

    Worker subprocesses and in-process engines reach them over loopback; the
    test thread reads their records and flips their switches (plain attribute
    stores, safe under the GIL).
    """

    def __init__(self, fakes: Iterable[Fake]) -> None:
        self.fakes = list(fakes)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> FakeThread:
        self._thread.start()
        for fake in self.fakes:
            asyncio.run_coroutine_threadsafe(fake.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        for fake in self.fakes:
            # A fake that fails to stop must not hide the test's own error.
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(fake.stop(), self.loop).result(10)
        asyncio.run_coroutine_threadsafe(_cancel_rest(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


async def _cancel_rest() -> None:
    """Handlers still hanging (timeout faults) are cancelled, not left for the GC."""
    current = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not current]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
