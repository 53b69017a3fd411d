"""Delivery: messages delivered per second through the fakes, with 1% transient failures.

1. Baseline: raw HTTP round trips to the fake SendGrid (httpx, the same
   payload and concurrency as the worker), nothing else: the most any email
   worker could push through this fake on this machine.
2. The ``delivery-email`` worker process: OutboundMessages produced to
   notify.outbound.email, delivered through the fake SendGrid with 1% of its
   answers a 503 (retried with backoff), every message claimed in PostgreSQL
   before the call and recorded after it, results relayed to notify.delivery.
   Timed from the first produce until every message is settled.

Prints messages/s for both and their ratio, the success ratio (messages
sent / messages produced, and accepted calls / calls) and the duplicates the
fake saw (must be 0).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from tests.fakes.delivery.kit import DeliveryFakes

from finstream.domain.time import utcnow
from finstream.settings import Settings
from finstream.sinks.delivery.sendgrid import SendGrid
from finstream.stack import Stack
from finstream.testing.services import TestEnv, WorkerProcess, create_env, destroy_env

COUNT = 2_000
BASELINE_COUNT = 2_000
CONCURRENCY = 16
ERROR_RATE = 0.01


def outbound(i: int) -> dict[str, Any]:
    mid = f"m-bench-{uuid.uuid4().hex[:20]}"
    return {
        "message_id": mid,
        "request_id": f"r-{mid}",
        "user_id": f"u-{i % 500}",
        "channel": "EMAIL",
        "category": "price_alert",
        "priority": "NORMAL",
        "recipient": f"user{i}@example.com",
        "platform": None,
        "locale": "en",
        "subject": "AAPL crossed 200",
        "body_text": f"AAPL crossed 200 ({mid})",
        "body_html": "<p>AAPL crossed <b>200</b></p>",
        "data": {"symbol": "AAPL"},
        "transactional": False,
        "created_at": utcnow(),
        "expires_at": None,
        "attempt": 0,
        "correlation_id": None,
    }


async def baseline(fakes: DeliveryFakes, settings: Settings) -> float:
    """Raw round trips with the payload the provider sends."""
    provider = SendGrid(settings, fakes.sendgrid.api_key)
    bodies = [provider.payload(outbound(i)) for i in range(BASELINE_COUNT)]
    await provider.close()
    headers = {"authorization": f"Bearer {fakes.sendgrid.api_key}"}
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    async with httpx.AsyncClient(
        limits=httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    ) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                r = await client.post(
                    f"{fakes.sendgrid.url}/v3/mail/send", json=body, headers=headers
                )
                assert r.status_code == 202, r.text

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return BASELINE_COUNT / (time.perf_counter() - started)


def settled(env: TestEnv, prefix: str) -> dict[str, int]:
    rows = env.sql(
        "SELECT state, count(*) AS n FROM deliveries WHERE message_id LIKE $1 GROUP BY state",
        f"{prefix}%",
    )
    return {r["state"]: r["n"] for r in rows}


def main() -> None:
    base = Settings()
    Stack(base).up(log=lambda _m: None)
    env = create_env(base, "bench-dlv")
    log_dir = base.stack_dir / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as tmp, DeliveryFakes(Path(tmp)) as fakes:
            settings = fakes.settings(env.settings)
            rate_base = asyncio.run(baseline(fakes, settings))
            print(f"baseline: raw HTTP round trips to the fake SendGrid: {rate_base:,.0f} req/s")
            fakes.sendgrid.recorder.accepted.clear()
            calls_before = fakes.sendgrid.recorder.requests

            fakes.sendgrid.faults.error_rate = ERROR_RATE
            overrides = fakes.env(
                delivery_email_providers="sendgrid",
                delivery_concurrency=str(CONCURRENCY),
                delivery_sendgrid_rate="100000",
                delivery_timeout="5",
                delivery_lease_seconds="30",
                log_level="WARNING",
            )
            worker = WorkerProcess(env, "delivery-email", log_dir, **overrides).start()
            try:
                messages = [outbound(i) for i in range(COUNT)]
                started = time.perf_counter()
                env.produce_records(
                    "notify.outbound.email",
                    "OutboundMessage",
                    [(m["user_id"], m) for m in messages],
                )
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    states = settled(env, "m-bench-")
                    done = sum(
                        n
                        for s, n in states.items()
                        if s in ("sent", "failed", "rejected", "expired")
                    )
                    if done >= COUNT:
                        break
                    time.sleep(0.1)
                elapsed = time.perf_counter() - started
            finally:
                worker.stop()
            states = settled(env, "m-bench-")
            counts = fakes.sendgrid.recorder.counts()
            ids = {m["message_id"] for m in messages}
            duplicates = sum(n - 1 for mid, n in counts.items() if mid in ids and n > 1)
            calls = fakes.sendgrid.recorder.requests - calls_before
            accepted = sum(n for mid, n in counts.items() if mid in ids)
            rate = COUNT / elapsed
            print(
                f"delivery-email worker, {ERROR_RATE:.0%} transient failures: {rate:,.0f} messages/s "
                f"({COUNT} in {elapsed:.1f}s, {rate / rate_base:.2f}x the baseline)"
            )
            print(
                f"success ratio: {states.get('sent', 0) / COUNT:.4f} of messages sent "
                f"({accepted / max(calls, 1):.4f} of provider calls accepted; {calls - accepted} failed calls retried)"
            )
            print(f"duplicates seen by the fake: {duplicates}")
            if duplicates or states.get("sent", 0) != COUNT:
                raise SystemExit(f"delivery bench failed: states {states}, duplicates {duplicates}")
    finally:
        destroy_env(env, base)


if __name__ == "__main__":
    main()
