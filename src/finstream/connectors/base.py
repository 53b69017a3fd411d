"""The small contract every market-data connector implements, and its two bases.

* :class:`PollingConnector` — ``fetch(symbols)`` returns a :class:`PollResult`:
  validated ticks, the symbols served, symbols the provider does not know,
  per-symbol errors and, when the request as a whole failed, one classified
  ``error``. It never raises for provider trouble (the chain needs partial
  results); :class:`HttpConnector` does the HTTP part with httpx: rate-limit
  tokens, timeouts, a body size cap, status classification, Retry-After and
  X-Ratelimit-Reset, and secrets kept out of every message.
* :class:`StreamConnector` — ``run(emit, stop)`` keeps a feed going for the
  symbols given with ``set_symbols`` and reports ``healthy(now)``;
  :class:`WebSocketConnector` reconnects with backoff and jitter, resubscribes,
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
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Literal

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from finstream.connectors.metrics import (
    PROVIDER_ERRORS,
    RATE_LIMIT_WAIT,
    RATE_LIMITED,
    REQUEST_SECONDS,
    STREAM_RECONNECTS,
)
from finstream.domain.marketdata.failover import Outcome, ProviderGate
from finstream.domain.marketdata.normalize import (
    LOCAL_RATE_LIMIT,
    MAX_BODY_BYTES,
    body_hint,
    classify_status,
    malformed,
    scrub,
)
from finstream.domain.marketdata.ticks import Tick, TickValidationError, validate_tick
from finstream.domain.resilience import Backoff, ErrorClass, ProviderError, parse_retry_after
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


# -- HTTP ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: httpx.Headers
    body: bytes
    received_at: datetime

    def retry_after(self, now: datetime | None = None) -> float | None:
        """Seconds to wait, from Retry-After or an X-Ratelimit-Reset epoch when exhausted."""
        value = parse_retry_after(self.headers.get("retry-after"))
        if value is not None:
            return value
        reset = self.headers.get("x-ratelimit-reset")
        remaining = self.headers.get("x-ratelimit-remaining")
        if reset is None or (remaining is not None and remaining.strip() not in ("0", "")):
            return None
        try:
            epoch = float(reset)
        except ValueError:
            return None
        now = now or datetime.now(UTC)
        # Some APIs send seconds-until-reset rather than an epoch; tell them apart by size.
        seconds = epoch - now.timestamp() if epoch > 1e9 else epoch
        return min(max(seconds, 0.0), 24 * 3600.0)


class HttpConnector(PollingConnector):
    """httpx-based polling with rate-limit tokens, classification and a body cap."""

    base_url: str

    def __init__(
        self,
        gate: ProviderGate,
        options: ConnectorOptions,
        base_url: str,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(gate, options)
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(
            timeout=options.timeout,
            headers={"User-Agent": "finstream/0.1 (+market-data connector)"},
            follow_redirects=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def acquire(self) -> None:
        """One request's rate-limit tokens, waiting at most ``max_wait`` for them."""
        clock = self.options.clock
        deadline = clock() + self.options.max_wait
        while True:
            now = clock()
            if self.gate.try_acquire(now):
                return
            wait = self.gate.wait_time(now)
            if now + wait > deadline:
                RATE_LIMITED.labels(self.name).inc()
                raise ProviderError(
                    ErrorClass.THROTTLED,
                    f"local rate limit: next request allowed in {wait:.2f}s",
                    provider=self.name,
                    retry_after=wait,
                    code=LOCAL_RATE_LIMIT,
                )
            RATE_LIMIT_WAIT.labels(self.name).inc(max(wait, 0.001))
            await self.options.sleep(max(wait, 0.001))

    async def get(
        self,
        url: str,
        params: dict[str, str] | None = None,
        *,
        rate_limited: bool = True,
        deadline: float | None = None,
    ) -> HttpReply:
        """GET with tokens, timeout and size cap; transport failures are transient errors.

        httpx's timeout bounds each network operation; ``deadline`` (default: the
        same timeout) bounds the whole exchange, so a body trickling in slower
        than any read timeout (a throttled link) cannot hold a cycle for minutes.
        """
        if rate_limited:
            await self.acquire()
        started = time.monotonic()
        limit = deadline if deadline is not None else self.options.timeout
        try:
            async with (
                asyncio.timeout(limit),
                self.client.stream("GET", url, params=params) as resp,
            ):
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > self.options.max_body_bytes:
                        raise malformed(
                            self.name,
                            f"body larger than {self.options.max_body_bytes} bytes",
                            "oversized",
                        )
                    chunks.append(chunk)
                return HttpReply(
                    resp.status_code, resp.headers, b"".join(chunks), self.options.wall()
                )
        except httpx.TimeoutException:
            raise ProviderError(
                ErrorClass.TRANSIENT,
                f"no answer within {self.options.timeout:g}s",
                provider=self.name,
                code="timeout",
            ) from None
        except TimeoutError:
            raise ProviderError(
                ErrorClass.TRANSIENT,
                f"the whole exchange took longer than {limit:g}s",
                provider=self.name,
                code="timeout",
            ) from None
        except httpx.InvalidURL as exc:
            raise ProviderError(
                ErrorClass.PERMANENT,
                f"invalid URL: {self.scrub(str(exc))}",
                provider=self.name,
                code="config",
            ) from None
        except httpx.HTTPError as exc:
            raise ProviderError(
                ErrorClass.TRANSIENT,
                f"request failed: {type(exc).__name__}: {self.scrub(str(exc)) or 'no detail'}",
                provider=self.name,
                code="connect",
            ) from None
        finally:
            REQUEST_SECONDS.labels(self.name).observe(time.monotonic() - started)

    def status_error(
        self,
        reply: HttpReply,
        not_found: ErrorClass = ErrorClass.UNKNOWN_SYMBOL,
        detail: str | None = None,
    ) -> ProviderError | None:
        return classify_status(
            reply.status,
            self.name,
            detail=self.scrub(detail if detail is not None else body_hint(reply.body)),
            retry_after=reply.retry_after(),
            not_found=not_found,
        )


def per_symbol(result: PollResult, symbol: str, error: ProviderError) -> bool:
    """File ``error`` under ``symbol`` in ``result``; False when it stops the whole request."""
    if error.error_class is ErrorClass.UNKNOWN_SYMBOL:
        result.unknown.add(symbol)
        return True
    if error.error_class is ErrorClass.MALFORMED and error.code not in ("html", "oversized"):
        result.symbol_errors[symbol] = error
        return True
    result.error = error
    return False


# -- WebSocket ------------------------------------------------------------------------------


class WebSocketConnector(StreamConnector):
    """Reconnecting WebSocket feed; a provider module adds URL, handshake and parsing."""

    ws_url: str

    def __init__(self, gate: ProviderGate, options: ConnectorOptions, ws_url: str) -> None:
        super().__init__(gate, options)
        self.ws_url = ws_url
        self.subscribed: set[str] = set()
        self.ready = False
        self.last_message = 0.0
        self.delivered = False  # the current connection has carried a message
        self.attempts = 0
        self.connections = 0
        self.last_error: ProviderError | None = None
        self.disconnects: Counter[str] = Counter()  # by cause: silent, closed, auth, ...
        self._rng = random.Random()

    # -- provider hooks ---------------------------------------------------------------------
    def connect_url(self) -> str:
        return self.ws_url

    async def handshake(self, ws: ClientConnection) -> None:
        """Authenticate after connecting (raise ProviderError on refusal)."""

    @abc.abstractmethod
    def subscribe_messages(self, symbols: Sequence[str]) -> list[str]: ...

    @abc.abstractmethod
    def unsubscribe_messages(self, symbols: Sequence[str]) -> list[str]: ...

    @abc.abstractmethod
    def parse(
        self, raw: str | bytes, received_at: datetime
    ) -> tuple[list[Tick], list[ProviderError]]:
        """Ticks and per-item errors of one message; raise ProviderError when the
        connection must be dropped (auth revoked, too many connections)."""

    # -- state ------------------------------------------------------------------------------
    def healthy(self, now: float) -> bool:
        return (
            self.ready
            and bool(self.want)
            and self.want <= self.subscribed
            and now - self.last_message < self.options.silence_timeout
        )

    def status(self, now: float) -> str:
        if self.healthy(now):
            return "healthy"
        if self.ready:
            return "connected, waiting for subscriptions or traffic"
        if self.last_error is not None:
            return f"reconnecting after {self.last_error}"
        return "connecting"

    # -- the reconnect loop -------------------------------------------------------------------
    async def run(self, emit: Emit, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self.want:
                self._changed.clear()
                waiter = asyncio.create_task(self._changed.wait())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                continue
            now = time.monotonic()
            # Half-open probes are the chain's; the stream only waits out an open circuit.
            delay = self.gate.breaker.retry_in(now)
            if delay > 0 and await sleep_or_stop(stop, delay):
                return
            try:
                await self._session(emit, stop)
                self.attempts = 0
            except ProviderError as exc:
                if self.delivered:
                    self.attempts = 0  # a connection that worked for a while starts afresh
                self.last_error = exc
                self.count_error(exc)
                cause = exc.code or exc.error_class.value
                self.disconnects[cause] += 1
                STREAM_RECONNECTS.labels(self.name, cause).inc()
                self.gate.breaker.record_failure(time.monotonic())
                self.attempts += 1
                delay = self.options.backoff.delay(self.attempts, self._rng, exc.retry_after)
                log.warning(
                    "stream disconnected",
                    provider=self.name,
                    error=str(exc),
                    error_class=exc.error_class.value,
                    reconnect_in=round(delay, 3),
                )
                if await sleep_or_stop(stop, delay):
                    return

    async def _session(self, emit: Emit, stop: asyncio.Event) -> None:
        self.ready = False
        self.subscribed = set()
        try:
            async with websockets.connect(
                self.connect_url(),
                open_timeout=self.options.timeout,
                close_timeout=2,
                ping_interval=max(self.options.silence_timeout / 2, 1.0),
                ping_timeout=self.options.silence_timeout,
                max_size=2**22,
                # proxy: the default, HTTPS_PROXY / NO_PROXY from the environment, as httpx does
            ) as ws:
                self.connections += 1
                # Healthy means "delivered lately": a fresh connection proves nothing until
                # a message (data, keepalive, or a handshake status) arrives.
                self.last_message = 0.0
                self.delivered = False
                await asyncio.wait_for(self.handshake(ws), timeout=self.options.timeout)
                self.gate.breaker.record_success(time.monotonic())
                self.last_error = None
                subscriber = asyncio.create_task(self._keep_subscriptions(ws))
                try:
                    await self._receive(ws, emit, stop, subscriber)
                finally:
                    subscriber.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await subscriber
        except ProviderError:
            raise
        except InvalidStatus as exc:
            status = exc.response.status_code
            error = classify_status(
                status, self.name, detail=self.scrub(body_hint(bytes(exc.response.body or b"")))
            )
            raise error or ProviderError(
                ErrorClass.TRANSIENT, f"HTTP {status}", provider=self.name
            ) from None
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            reason = exc.rcvd.reason if exc.rcvd else ""
            raise ProviderError(
                ErrorClass.TRANSIENT,
                f"connection closed (code {code}{', ' + self.scrub(reason) if reason else ''})",
                provider=self.name,
                code="closed",
            ) from None
        except TimeoutError:
            raise ProviderError(
                ErrorClass.TRANSIENT,
                "connect or handshake timed out",
                provider=self.name,
                code="timeout",
            ) from None
        except (OSError, WebSocketException) as exc:
            raise ProviderError(
                ErrorClass.TRANSIENT,
                f"{type(exc).__name__}: {self.scrub(str(exc))}",
                provider=self.name,
                code="connect",
            ) from None
        finally:
            self.ready = False

    async def _keep_subscriptions(self, ws: ClientConnection) -> None:
        """Send subscribe/unsubscribe diffs whenever the wanted set changes."""
        while True:
            self._changed.clear()
            want = set(self.want)
            if not want:
                await ws.close(1000, "no symbols wanted")
                return
            add = sorted(want - self.subscribed)
            drop = sorted(self.subscribed - want)
            for message in self.unsubscribe_messages(drop) if drop else []:
                await ws.send(message)
            for message in self.subscribe_messages(add) if add else []:
                await ws.send(message)
            self.subscribed = want
            self.ready = True
            await self._changed.wait()

    async def _receive(
        self, ws: ClientConnection, emit: Emit, stop: asyncio.Event, subscriber: asyncio.Task[None]
    ) -> None:
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                recv = asyncio.create_task(ws.recv())
                done, _ = await asyncio.wait(
                    {recv, stopper},
                    timeout=self.options.silence_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if recv not in done:
                    recv.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await recv
                    if stop.is_set():
                        return
                    raise ProviderError(
                        ErrorClass.TRANSIENT,
                        f"no message for {self.options.silence_timeout:g}s (silent connection)",
                        provider=self.name,
                        code="silent",
                    )
                try:
                    raw = recv.result()
                except ConnectionClosed:
                    if subscriber.done() and not self.want:
                        return  # we closed it: nothing is wanted any more
                    raise
                self.last_message = time.monotonic()
                self.delivered = True
                ticks, errors = self.parse(raw, utcnow())
                for error in errors:
                    self.count_error(error)
                    log.warning("stream message rejected", provider=self.name, error=str(error))
                for tick in ticks:
                    await emit(self.name, tick)
        finally:
            stopper.cancel()
