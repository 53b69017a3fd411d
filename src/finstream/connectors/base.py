"""The small contract every market-data connector implements, and its two bases.

* :class:`PollingConnector` — ``fetch(symbols)`` returns a :class:`PollResult`:
  validated ticks, the symbols served, symbols the provider does not know,
  per-symbol errors and, when the request as a whole failed, one classified
  ``error``. It never raises for provider trouble (the chain needs partial
  results); :class:`~finstream.connectors.http.HttpConnector` does the HTTP part with httpx: rate-limit
  tokens, timeouts, a body size cap, status classification, Retry-After and
  X-Ratelimit-Reset, and secrets kept out of every message.
* :class:`StreamConnector` — ``run(emit, stop)`` keeps a feed going for the
  symbols given with ``set_symbols`` and reports ``healthy(now)``;
  :class:`~finstream.connectors.websocket.WebSocketConnector` reconnects with backoff and jitter, resubscribes,
  answers pings (the websockets library answers protocol pings; provider
  keepalive messages count as traffic), and treats a connection that says
  nothing for ``silence_timeout`` seconds as dead.

A provider module subclasses one of them, parses its wire format with pure
functions (tested on recorded bodies), and registers itself with one line in
:mod:`finstream.connectors.registry`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar, Literal

from finstream.connectors.metrics import (
    PROVIDER_ERRORS,
)
from finstream.domain.marketdata.failover import Outcome, ProviderGate
from finstream.domain.marketdata.normalize import (
    MAX_BODY_BYTES,
    malformed,
    scrub,
)
from finstream.domain.marketdata.ticks import Tick, TickValidationError, validate_tick
from finstream.domain.resilience import Backoff, ErrorClass, ProviderError
from finstream.domain.time import utcnow
from finstream.runtime.logging import get_logger

log = get_logger(__name__)

Emit = Callable[[str, Tick], Awaitable[None]]


@dataclass
class PollResult(Outcome):
    ticks: list[Tick] = field(default_factory=list)

    def add(self, symbol: str, tick: Tick) -> None:
        self.ticks.append(tick)
        self.served.add(symbol)


@dataclass(frozen=True)
class ConnectorOptions:
    """What every connector needs from settings, gathered once.

    ``clock`` and ``sleep`` are what rate limits and pauses are measured with
    (monotonic seconds), ``wall`` is when an answer was received (UTC); tests
    pass fakes of all three to run a simulated hour at once.
    """

    timeout: float = 10.0
    max_wait: float = 0.0  # longest wait for a rate-limit token before giving up this cycle
    max_future: timedelta = timedelta(seconds=300)
    silence_timeout: float = 30.0
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.5, cap=30.0))
    max_body_bytes: int = MAX_BODY_BYTES
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    wall: Callable[[], datetime] = utcnow


class Connector(abc.ABC):
    name: ClassVar[str]
    kind: ClassVar[Literal["poll", "stream"]]
    description: ClassVar[str]
    documented_limits: ClassVar[str] = ""

    def __init__(self, gate: ProviderGate, options: ConnectorOptions) -> None:
        self.gate = gate
        self.options = options

    @property
    def secrets(self) -> tuple[str, ...]:
        """Credential values that must never appear in a message or log line."""
        return ()

    def scrub(self, text: str) -> str:
        return scrub(text, self.secrets)

    def configuration_problem(self) -> str | None:
        """Why the connector cannot work as configured (e.g. no API key), or None."""
        return None

    def validated(self, tick: Tick, now: datetime | None = None) -> Tick:
        """A tick that passed the plausibility checks, or a malformed error."""
        try:
            return validate_tick(tick, now or self.options.wall(), self.options.max_future)
        except TickValidationError as exc:
            raise malformed(self.name, f"{tick.symbol}: {exc}", exc.reason) from None

    @abc.abstractmethod
    async def check(self, symbol: str) -> str:
        """Try the provider for real with ``symbol``: a line saying what came back.

        Raises ProviderError when it does not work (`finstream providers check`).
        """

    async def wait(self, stop: asyncio.Event, seconds: float) -> bool:
        """Wait ``seconds`` on the connector's clock, or until ``stop``; True when stopped."""
        if self.options.sleep is asyncio.sleep:  # the real clock: wake at once on stop
            return await sleep_or_stop(stop, seconds)
        await self.options.sleep(max(seconds, 0.0))
        return stop.is_set()

    def count_error(self, error: ProviderError) -> None:
        PROVIDER_ERRORS.labels(self.name, error.error_class.value).inc()

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class PollingConnector(Connector):
    kind: ClassVar[Literal["poll", "stream"]] = "poll"
    supports_backfill: ClassVar[bool] = False

    @abc.abstractmethod
    async def fetch(self, symbols: Sequence[str]) -> PollResult:
        """Latest quotes for ``symbols``; provider trouble goes into the result, never raised."""

    async def backfill(self, symbol: str, start: datetime, end: datetime) -> list[Tick]:
        """Ticks derived from intraday bars in [start, end); raises ProviderError."""
        raise ProviderError(
            ErrorClass.PERMANENT, "this provider has no intraday bars", provider=self.name
        )

    async def check(self, symbol: str) -> str:
        """One real request for ``symbol``: a line saying what came back; raises ProviderError."""
        result = await self.fetch([symbol])
        if result.error is not None:
            raise result.error
        if symbol in result.unknown:
            return f"credentials accepted; {symbol} is unknown to this provider"
        if symbol in result.symbol_errors:
            raise result.symbol_errors[symbol]
        tick = next(t for t in result.ticks if t.symbol == symbol)
        return f"ok: {symbol} {tick.price} at {tick.ts.isoformat()}"


class StreamConnector(Connector):
    kind: ClassVar[Literal["poll", "stream"]] = "stream"

    def __init__(self, gate: ProviderGate, options: ConnectorOptions) -> None:
        super().__init__(gate, options)
        self.want: frozenset[str] = frozenset()
        self._changed = asyncio.Event()
        self.finished = False  # a finite feed (replay) that has played to the end

    def set_symbols(self, symbols: Sequence[str] | set[str] | frozenset[str]) -> None:
        new = frozenset(symbols)
        if new != self.want:
            self.want = new
            self._changed.set()

    @abc.abstractmethod
    async def run(self, emit: Emit, stop: asyncio.Event) -> None:
        """Feed ticks to ``emit`` until ``stop`` is set (or the feed ends)."""

    @abc.abstractmethod
    def healthy(self, now: float) -> bool:
        """Whether the feed is currently delivering for every wanted symbol."""

    def status(self, now: float) -> str:
        return "healthy" if self.healthy(now) else "not ready"

    async def check(self, symbol: str) -> str:
        """Connect, subscribe to ``symbol`` and wait for the feed to come up."""
        stop = asyncio.Event()
        got: list[Tick] = []

        async def emit(_: str, tick: Tick) -> None:
            got.append(tick)

        self.set_symbols({symbol})
        task = asyncio.create_task(self.run(emit, stop))
        deadline = time.monotonic() + self.options.timeout
        try:
            while time.monotonic() < deadline and not task.done():
                if self.healthy(time.monotonic()):
                    return f"ok: connected and subscribed to {symbol}" + (
                        f"; first tick {got[0].price}" if got else ""
                    )
                await asyncio.sleep(0.05)
            last: ProviderError | None = getattr(self, "last_error", None)
            if last is not None:
                raise last  # the provider's own answer (auth failed, ...) says more
            raise ProviderError(
                ErrorClass.TRANSIENT,
                f"not subscribed within {self.options.timeout:g}s ({self.status(time.monotonic())})",
                provider=self.name,
            )
        finally:
            stop.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True when ``stop`` was set meanwhile. Always yields,
    so a loop that is behind schedule cannot starve the event loop."""
    if seconds <= 0:
        await asyncio.sleep(0)
        return stop.is_set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()
