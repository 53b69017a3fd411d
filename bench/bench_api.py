"""API: WebSocket fan-out and REST quote reads, each beside a plain-Redis baseline.

The API runs as the ``api`` worker role (what ``make run`` starts) in its own
process; this process is the clients. Figures:

1. Fan-out: 1,000 WebSocket clients subscribed to one symbol's quotes. Quotes
   are PUBLISHed to Redis (as the quotes agent does) at a fixed rate, then in
   a burst. Messages delivered per second (all clients together) and
   publish-to-client latency p50/p99. Baseline: the same publishes to ONE raw
   Redis pub/sub subscriber (redis-py), the floor any fan-out sits on.
2. REST: ``GET /v1/quotes/{symbol}`` with a bearer token, 32 requests in
   flight, for a few seconds. Baseline: the same HGETALL of the quote hash
   from a plain Redis client with 32 in flight.

Both sides share the machine's cores, so the figures are ratios more than
absolutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import websockets

from finstream.domain.marketdata.ticks import make_tick
from finstream.domain.time import utcnow
from finstream.settings import Settings
from finstream.sinks.quote_cache import QuoteCache
from finstream.stack import Stack
from finstream.testing.api import AUDIENCE, ISSUER, Keys
from finstream.testing.services import TestEnv, WorkerProcess, create_env, destroy_env, free_port

CLIENTS = 1_000
RATE = 10  # quotes per second at the fixed rate: 10,000 deliveries per second
RATE_SECONDS = 8
BURST = 200
REST_SECONDS = 5.0
IN_FLIGHT = 32
SYMBOL = "BENCH"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1] if values else float("nan")
    )


def payload(seq: int) -> str:
    # The quotes agent's JSON, plus the publish time (CLOCK_MONOTONIC is system-wide on Linux).
    return json.dumps(
        {"symbol": SYMBOL, "price": f"{100 + seq % 7}.25", "seq": seq, "pub": time.monotonic_ns()}
    )


async def publish(redis: aioredis.Redis, channel: str, count: int, rate: float | None) -> float:
    """At ``rate`` per second, or (None) all at once in one pipeline."""
    started = time.perf_counter()
    if rate is None:
        async with redis.pipeline(transaction=False) as pipe:
            for seq in range(count):
                pipe.publish(channel, payload(seq))
            await pipe.execute()
        return started
    for seq in range(count):
        await asyncio.sleep(max(started + seq / rate - time.perf_counter(), 0))
        await redis.publish(channel, payload(seq))
    return started


class Receiver:
    """Counts deliveries and their latencies."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.last = 0.0
        self.done = asyncio.Event()
        self.expected = 0

    def got(self, pub_ns: int) -> None:
        now = time.monotonic_ns()
        self.latencies.append((now - pub_ns) / 1e6)
        self.last = time.perf_counter()
        if len(self.latencies) >= self.expected:
            self.done.set()

    def reset(self, expected: int) -> None:
        self.latencies = []
        self.expected = expected
        self.done.clear()


async def baseline_pubsub(redis: aioredis.Redis, ns: str) -> dict[str, float]:
    channel = f"{ns}baseline:{SYMBOL}"
    sub = redis.pubsub(ignore_subscribe_messages=True)
    await sub.subscribe(channel)
    recv = Receiver()

    async def listen() -> None:
        while True:
            msg = await sub.get_message(timeout=1.0)
            if msg is not None:
                recv.got(json.loads(msg["data"])["pub"])

    task = asyncio.create_task(listen())
    try:
        recv.reset(RATE * RATE_SECONDS)
        await publish(redis, channel, RATE * RATE_SECONDS, RATE)
        await asyncio.wait_for(recv.done.wait(), 30)
        fixed = list(recv.latencies)
        recv.reset(BURST)
        started = await publish(redis, channel, BURST, None)
        await asyncio.wait_for(recv.done.wait(), 30)
        burst_rate = BURST / (recv.last - started)
    finally:
        task.cancel()
        await sub.aclose()
    return {"p50": pct(fixed, 50), "p99": pct(fixed, 99), "burst_per_s": burst_rate}


async def fan_out(
    url: str, token: str, redis: aioredis.Redis, channel: str, server_pid: int
) -> dict[str, float]:
    recv = Receiver()
    conns: list[Any] = []

    async def open_one() -> None:
        ws = await websockets.connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=60,
            compression=None,
        )
        await ws.recv()  # welcome
        await ws.send(json.dumps({"type": "subscribe", "stream": "quotes", "symbol": SYMBOL}))
        while json.loads(await ws.recv())["type"] != "subscribed":
            pass
        conns.append(ws)

    connect_started = time.perf_counter()
    for i in range(0, CLIENTS, 100):
        await asyncio.gather(*(open_one() for _ in range(min(100, CLIENTS - i))))
    connect_s = time.perf_counter() - connect_started

    async def listen(ws: Any) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            if frame.get("type") == "quote" and not frame.get("snapshot"):
                recv.got(frame["data"]["pub"])
            elif frame.get("type") == "error":
                raise RuntimeError(f"client dropped: {frame}")

    tasks = [asyncio.create_task(listen(ws)) for ws in conns]
    try:
        recv.reset(CLIENTS * RATE * RATE_SECONDS)
        fixed_started = await publish(redis, channel, RATE * RATE_SECONDS, RATE)
        # What is not delivered in time shows below as a shortfall.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(recv.done.wait(), 120)
        fixed = list(recv.latencies)
        fixed_s = recv.last - fixed_started
        recv.reset(CLIENTS * BURST)
        server_cpu, client_cpu = cpu_seconds(server_pid), cpu_seconds(os.getpid())
        started = await publish(redis, channel, BURST, None)
        await asyncio.wait_for(recv.done.wait(), 120)
        burst_rate = CLIENTS * BURST / (recv.last - started)
        server_cpu = cpu_seconds(server_pid) - server_cpu
        client_cpu = cpu_seconds(os.getpid()) - client_cpu
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    return {
        "connect_s": connect_s,
        "p50": pct(fixed, 50),
        "p99": pct(fixed, 99),
        # Delivered over the time it took (first publish to last delivery),
        # not over the nominal seconds: a slow fan-out shows as a lower rate.
        "fixed_per_s": len(fixed) / fixed_s,
        "fixed_delivered": len(fixed),
        "fixed_offered": CLIENTS * RATE * RATE_SECONDS,
        "burst_per_s": burst_rate,
        "server_us": server_cpu / (CLIENTS * BURST) * 1e6,
        "client_us": client_cpu / (CLIENTS * BURST) * 1e6,
    }


async def for_a_while(worker: Any) -> tuple[int, float]:
    count = 0
    stop = time.perf_counter() + REST_SECONDS
    started = time.perf_counter()

    async def loop() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await worker()
            count += 1

    await asyncio.gather(*(loop() for _ in range(IN_FLIGHT)))
    return count, time.perf_counter() - started


async def rest(base: str, token: str, cache: QuoteCache) -> dict[str, float]:
    async def plain() -> None:
        assert await cache.get(SYMBOL) is not None

    base_n, base_s = await for_a_while(plain)
    # aiohttp, not httpx, as the load generator: httpx's connection pool serializes
    # concurrent requests (encode/httpx#3215) and would measure itself, not the API.
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(base, connector=connector) as session:
        headers = {"Authorization": f"Bearer {token}"}

        async def api() -> None:
            async with session.get(f"/v1/quotes/{SYMBOL}", headers=headers) as resp:
                body = await resp.read()
                assert resp.status == 200, body

        await api()
        api_n, api_s = await for_a_while(api)
    return {"baseline_per_s": base_n / base_s, "api_per_s": api_n / api_s}


async def run(env: TestEnv, keys: Keys, port: int, server_pid: int) -> None:
    settings = env.settings
    redis = aioredis.from_url(settings.redis_url.get_secret_value())
    cache = QuoteCache(redis, settings)
    now = utcnow()
    await cache.update(make_tick(symbol=SYMBOL, price="101.5", ts=now, received_at=now, source="b"))
    token = keys.token("bench-user", ttl=3600)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        base = await baseline_pubsub(redis, settings.namespace)
        fan = await fan_out(
            f"ws://127.0.0.1:{port}/v1/stream", token, redis, cache.channel(SYMBOL), server_pid
        )
        print(f"machine load average before the run: {load}")
        print(f"websocket clients: {CLIENTS:,} connected in {fan['connect_s']:.1f}s, one symbol")
        print(
            f"baseline raw Redis pub/sub, 1 subscriber, {RATE}/s: latency p50 {base['p50']:.2f} ms,"
            f" p99 {base['p99']:.2f} ms; burst {base['burst_per_s']:,.0f} msg/s"
        )
        print(
            f"websocket fan-out, {RATE} quotes/s x {CLIENTS:,} clients offered: "
            f"{fan['fixed_delivered']:,} of {fan['fixed_offered']:,} messages delivered "
            f"at {fan['fixed_per_s']:,.0f} msg/s (first publish to last delivery), "
            "publish-to-client latency "
            f"p50 {fan['p50']:.2f} ms, p99 {fan['p99']:.2f} ms "
            f"(x{fan['p50'] / base['p50']:.1f} / x{fan['p99'] / base['p99']:.1f} the baseline)"
        )
        print(
            f"websocket fan-out, burst of {BURST} quotes x {CLIENTS:,} clients: "
            f"{fan['burst_per_s']:,.0f} msg/s delivered "
            f"(x{fan['burst_per_s'] / base['burst_per_s']:.1f} the 1-subscriber baseline's msg/s); "
            f"CPU per delivered message: server {fan['server_us']:.0f} us, "
            f"clients {fan['client_us']:.0f} us"
        )
        r = await rest(f"http://127.0.0.1:{port}", token, cache)
        print(
            f"baseline Redis HGETALL of the quote, {IN_FLIGHT} in flight: {r['baseline_per_s']:,.0f}/s"
        )
        print(
            f"REST GET /v1/quotes/{SYMBOL} with a bearer token, {IN_FLIGHT} in flight: "
            f"{r['api_per_s']:,.0f} requests/s ({r['api_per_s'] / r['baseline_per_s']:.2f}x the baseline)"
        )
    finally:
        await redis.aclose()


def main() -> None:
    base = Settings()
    Stack(base).up(log=lambda _m: None)
    env = create_env(base, "bench-api")
    with TemporaryDirectory() as tmp:
        keys = Keys.create(Path(tmp))
        port = free_port()
        worker = WorkerProcess(
            env,
            "api",
            base.stack_dir,
            api_port=str(port),
            api_jwks=str(keys.jwks_path),
            api_jwt_issuer=ISSUER,
            api_jwt_audience=AUDIENCE,
            api_rate_limit="100000000",
            api_ws_queue_size="1024",
            api_ws_heartbeat_seconds="30",
            log_level="WARNING",
        )
        try:
            worker.start()
            assert worker.proc is not None
            asyncio.run(run(env, keys, port, worker.proc.pid))
        finally:
            worker.stop()
            destroy_env(env, base)


if __name__ == "__main__":
    main()
