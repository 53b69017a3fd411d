"""``/v1/stream`` with the websockets client library against a running uvicorn server.

Authentication on connect (never the URL), quotes/bars/inbox subscriptions,
heartbeats, the subscription cap, one shared Redis pub/sub connection per
process, and a slow client told and dropped without holding up the others.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from finstream.api.deps import Resources
from finstream.domain.marketdata.ticks import make_tick
from finstream.domain.time import utcnow
from finstream.settings import Settings
from tests.support.api import Keys, api_server, api_settings
from tests.support.services import TestEnv

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys.create(tmp_path_factory.mktemp("jwks"))


@pytest.fixture(scope="module")
def settings(env: TestEnv, keys: Keys) -> Settings:
    return api_settings(
        env.settings,
        keys,
        api_jwt_leeway_seconds=0.0,
        api_ws_auth_timeout_seconds=1.0,
        api_ws_heartbeat_seconds=0.5,
        api_ws_queue_size=16,
        api_ws_max_subscriptions=4,
    )


@pytest.fixture(scope="module")
async def server(settings: Settings) -> AsyncIterator[tuple[str, Resources]]:
    async with api_server(settings) as pair:
        yield pair


def url(server: tuple[str, Resources]) -> str:
    return f"{server[0]}/v1/stream"


async def connect(server: tuple[str, Resources], token: str | None, **kw: Any) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return await websockets.connect(url(server), additional_headers=headers, **kw)


async def next_frame(
    ws: ClientConnection, kind: str | None = None, wait: float = 5.0
) -> dict[str, Any]:
    """The next frame (of a type, skipping heartbeats), or fail after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        frame: dict[str, Any] = json.loads(
            await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
        )
        if kind is None and frame["type"] != "heartbeat":
            return frame
        if frame["type"] == kind:
            return frame


async def closed_with(ws: ClientConnection, wait: float = 5.0) -> tuple[int, list[dict[str, Any]]]:
    """Read until the server closes; the close code and the frames seen."""
    frames = []
    try:
        async with asyncio.timeout(wait):
            async for raw in ws:
                frames.append(json.loads(raw))
    except websockets.ConnectionClosed:
        pass
    assert ws.close_code is not None, "the server did not close the connection"
    return ws.close_code, frames


async def subscribe(ws: ClientConnection, **msg: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "subscribe", **msg}))
    return await next_frame(ws, "subscribed")


async def test_authentication_on_connect(server: tuple[str, Resources], keys: Keys) -> None:
    token = keys.token("alice")
    async with await connect(server, token) as ws:
        welcome = await next_frame(ws)
        assert (welcome["type"], welcome["subject"]) == ("welcome", "alice")
    # Browsers: the token as a subprotocol; the server answers with finstream.v1 only.
    async with websockets.connect(
        url(server), subprotocols=["finstream.v1", f"bearer.{token}"]
    ) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "finstream.v1"
        assert (await next_frame(ws))["subject"] == "alice"
    async with websockets.connect(url(server)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token}))
        assert (await next_frame(ws))["type"] == "welcome"

    for bad in (keys.token(ttl=-30), keys.token(aud="other"), keys.forged(), "garbage"):
        ws = await connect(server, bad)
        code, frames = await closed_with(ws)
        assert code == 4001
        assert frames[0]["code"] == "unauthorized"
    # Nothing sent, or the token only in the URL: refused after the auth timeout.
    for target in (url(server), f"{url(server)}?access_token={token}"):
        started = time.monotonic()
        ws = await websockets.connect(target)
        code, frames = await closed_with(ws)
        assert code == 4001
        assert frames == [
            {"type": "error", "code": "unauthorized", "message": frames[0]["message"]}
        ]
        assert time.monotonic() - started >= 0.9


async def test_quotes_bars_and_own_inbox(server: tuple[str, Resources], keys: Keys) -> None:
    _, res = server
    now = utcnow()
    await res.quotes.update(
        make_tick(symbol="MSFT", price="410.10", ts=now, received_at=now, source="t")
    )
    async with await connect(server, keys.token("bea")) as ws:
        await next_frame(ws, "welcome")
        sub = await subscribe(ws, stream="quotes", symbol="msft", id=7)
        assert (sub["symbol"], sub["id"]) == ("MSFT", 7)
        snapshot = await next_frame(ws, "quote")
        assert snapshot["snapshot"] is True
        assert snapshot["data"]["price"] == "410.1"
        later = now + timedelta(seconds=1)
        await res.quotes.update(
            make_tick(symbol="MSFT", price="411", ts=later, received_at=later, source="t")
        )
        live = await next_frame(ws, "quote")
        assert "snapshot" not in live
        assert (live["symbol"], live["data"]["price"]) == ("MSFT", "411")

        await subscribe(ws, stream="bars", symbol="MSFT", interval="1m")
        bar = {"symbol": "MSFT", "interval": "1m", "open": "410", "close": "411", "revision": 0}
        await res.redis.publish(res.settings.redis_key("bars:1m:MSFT"), json.dumps(bar))
        frame = await next_frame(ws, "bar")
        assert (frame["symbol"], frame["interval"], frame["data"]) == ("MSFT", "1m", bar)

        await subscribe(ws, stream="inbox")
        await res.inbox.add("someone-else", "x1", {"body": "not for bea"}, 1.0)
        await res.inbox.add("bea", "b1", {"body": "for bea"}, 2.0)
        frame = await next_frame(ws, "inbox")
        assert frame["data"]["message_id"] == "b1", "only the caller's own inbox"

        await ws.send(json.dumps({"type": "unsubscribe", "stream": "quotes", "symbol": "MSFT"}))
        assert (await next_frame(ws, "unsubscribed"))["symbol"] == "MSFT"
        await res.quotes.update(
            make_tick(
                symbol="MSFT",
                price="412",
                ts=later + timedelta(seconds=1),
                received_at=now,
                source="t",
            )
        )
        await ws.send(json.dumps({"type": "ping", "id": "p"}))
        assert await next_frame(ws) == {"type": "pong", "id": "p"}, "no quote after unsubscribing"


async def test_protocol_errors_and_subscription_cap(
    server: tuple[str, Resources], keys: Keys
) -> None:
    async with await connect(server, keys.token("cid")) as ws:
        await next_frame(ws, "welcome")
        await ws.send("not json")
        assert (await next_frame(ws))["code"] == "bad_request"
        await ws.send(json.dumps({"type": "subscribe", "stream": "weather"}))
        assert (await next_frame(ws))["code"] == "bad_request"
        await ws.send(json.dumps({"type": "subscribe", "stream": "quotes", "symbol": "no way!"}))
        assert "symbol" in (await next_frame(ws))["message"]
        for symbol in ("A", "B", "C", "D"):
            await subscribe(ws, stream="quotes", symbol=symbol)
        await ws.send(json.dumps({"type": "subscribe", "stream": "quotes", "symbol": "E"}))
        assert (await next_frame(ws))["code"] == "too_many_subscriptions"
        assert (await next_frame(ws, "heartbeat", wait=2))["ts"] > 0
        await ws.send(b"\x00binary")
        code, frames = await closed_with(ws)
        assert code == 1003
        assert frames[-1]["code"] == "bad_frame"
    service = await connect(server, keys.token("svc", ["service"]))
    await next_frame(service, "welcome")
    await service.send(json.dumps({"type": "subscribe", "stream": "inbox"}))
    assert (await next_frame(service))["code"] == "forbidden"
    await service.close()


async def test_one_shared_pubsub_connection_fans_out(
    server: tuple[str, Resources], keys: Keys, settings: Settings
) -> None:
    _, res = server
    clients = [await connect(server, keys.token(f"u{i}")) for i in range(30)]
    try:
        for i, ws in enumerate(clients):
            await next_frame(ws, "welcome")
            await subscribe(ws, stream="quotes", symbol=("FAN1", "FAN2", "FAN3")[i % 3])
        name = f"{settings.namespace}finstream-api-hub"
        listing = await res.redis.client_list()
        hub_conns = [c for c in listing if c.get("name") == name]
        assert len(hub_conns) == 1, "one pub/sub connection for every WebSocket client"
        assert int(hub_conns[0]["sub"]) == 4  # three symbols plus the hub's control channel
        counts = dict(
            await res.redis.pubsub_numsub(
                *[res.quotes.channel(s) for s in ("FAN1", "FAN2", "FAN3")]
            )
        )
        assert set(counts.values()) == {1}
        now = utcnow()
        await res.quotes.update(
            make_tick(symbol="FAN1", price="5", ts=now, received_at=now, source="t")
        )
        got = await asyncio.gather(*(next_frame(ws, "quote") for ws in clients[::3]))
        assert {g["symbol"] for g in got} == {"FAN1"}
        assert len(got) == 10
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))
    # The last client leaving unsubscribes the channel (reference counting).
    channel = res.quotes.channel("FAN1")
    for _ in range(100):
        if dict(await res.redis.pubsub_numsub(channel))[channel.encode()] == 0:
            break
        await asyncio.sleep(0.05)
    assert dict(await res.redis.pubsub_numsub(channel))[channel.encode()] == 0
    assert res.hub.subscribers(channel) == 0


async def test_lost_pubsub_connection_is_restored_and_clients_told(
    server: tuple[str, Resources], keys: Keys, settings: Settings
) -> None:
    _, res = server
    async with await connect(server, keys.token("gus")) as ws:
        await next_frame(ws, "welcome")
        await subscribe(ws, stream="quotes", symbol="GAP")
        name = f"{settings.namespace}finstream-api-hub"
        hub = [c for c in await res.redis.client_list() if c.get("name") == name]
        await res.redis.execute_command("CLIENT", "KILL", "ID", hub[0]["id"])
        gap = await next_frame(ws, "gap", wait=10)
        assert "refetch" in gap["message"]
        # Re-subscribed on the new connection: live quotes flow again.
        now = utcnow()
        await res.quotes.update(
            make_tick(symbol="GAP", price="7", ts=now, received_at=now, source="t")
        )
        assert (await next_frame(ws, "quote"))["data"]["price"] == "7"
        assert res.hub.healthy


async def test_slow_client_is_told_and_dropped(server: tuple[str, Resources], keys: Keys) -> None:
    _, res = server
    channel = res.settings.redis_key("bars:1m:SLOW")
    # A client that stops reading: the library buffers one frame, the kernel a
    # small fixed receive buffer (no autotuning), then TCP pushes back on the server.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    host, port = server[0].removeprefix("ws://").split(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    slow = await connect(server, keys.token("slow"), max_queue=1, sock=sock)
    fast = await connect(server, keys.token("fast"))
    for ws in (slow, fast):
        await next_frame(ws, "welcome")
        await subscribe(ws, stream="bars", symbol="SLOW")
    # Incompressible: permessage-deflate would shrink a repetitive payload to nothing.
    payload = json.dumps({"pad": base64.b64encode(os.urandom(48_000)).decode()})
    count = 200

    async def read_all() -> int:
        n = 0
        while n < count:
            frame = await next_frame(fast, "bar", wait=20)
            n += 1 if frame["type"] == "bar" else 0
        return n

    reader = asyncio.create_task(read_all())
    started = time.monotonic()
    for _ in range(count):
        await res.redis.publish(channel, payload)
    assert await reader == count, "the fast client got everything"
    fast_seconds = time.monotonic() - started
    code, frames = await closed_with(slow, wait=20)
    assert code == 4008
    assert frames[-1]["code"] == "slow_consumer"
    assert sum(1 for f in frames if f["type"] == "bar") < count
    assert fast_seconds < 15
    await fast.close()


async def test_token_expiry_closes_unless_renewed(
    server: tuple[str, Resources], keys: Keys
) -> None:
    # Lifetimes of seconds, not one: the renewal must arrive before the first token
    # expires, and the second connection must open before its token does, on a loaded
    # machine (``exp`` is whole seconds, so a token lives up to a second less).
    minted = time.time()
    short = keys.token("dan", ttl=6)
    async with await connect(server, short) as ws:
        await next_frame(ws, "welcome")
        await ws.send(json.dumps({"type": "auth", "token": keys.token("dan", ttl=600), "id": 1}))
        assert (await next_frame(ws, "authenticated"))["id"] == 1
        await ws.send(json.dumps({"type": "auth", "token": keys.token("eve"), "id": 2}))
        assert (await next_frame(ws))["code"] == "forbidden"
        await asyncio.sleep(max(0.0, minted + 6.5 - time.time()))  # past the first's expiry
        await ws.send(json.dumps({"type": "ping"}))
        assert (await next_frame(ws))["type"] == "pong", "renewed: still open"
    ws = await connect(server, keys.token("dan", ttl=4))
    code, frames = await closed_with(ws, wait=20)
    assert code == 4001
    assert frames[-1]["code"] == "token_expired"
