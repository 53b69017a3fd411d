"""Streaming connectors' base: :class:`WebSocketConnector` reconnects with backoff
and jitter, resubscribes, answers pings (the websockets library answers
protocol pings; provider keepalive messages count as traffic), and treats a
connection that says nothing for ``silence_timeout`` seconds as dead.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from finstream.connectors.base import (
    ConnectorOptions,
    Emit,
    StreamConnector,
    sleep_or_stop,
)
from finstream.connectors.metrics import (
    STREAM_RECONNECTS,
)
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.normalize import (
    body_hint,
    classify_status,
)
from finstream.domain.marketdata.ticks import Tick
from finstream.domain.resilience import ErrorClass, ProviderError
from finstream.domain.time import utcnow
from finstream.runtime.logging import get_logger

log = get_logger(__name__)


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
