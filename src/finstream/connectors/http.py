"""HTTP polling connectors' base: :class:`HttpConnector` does the HTTP part with
httpx (rate-limit tokens, timeouts, a body size cap, status classification,
Retry-After and X-Ratelimit-Reset, and secrets kept out of every message).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from finstream.connectors.base import (
    ConnectorOptions,
    PollingConnector,
    PollResult,
)
from finstream.connectors.metrics import (
    RATE_LIMIT_WAIT,
    RATE_LIMITED,
    REQUEST_SECONDS,
)
from finstream.domain.marketdata.failover import ProviderGate
from finstream.domain.marketdata.normalize import (
    LOCAL_RATE_LIMIT,
    body_hint,
    classify_status,
    malformed,
)
from finstream.domain.resilience import ErrorClass, ProviderError, parse_retry_after
from finstream.runtime.logging import get_logger

log = get_logger(__name__)


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
