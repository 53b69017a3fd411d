"""A small WebSocket client of ``/v1/stream`` (``finstream api stream``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import websockets

from finstream.api.stream import SUBPROTOCOL


def subscriptions(
    symbols: Sequence[str], bars: str | None = None, inbox: bool = False
) -> list[dict[str, Any]]:
    subs: list[dict[str, Any]] = []
    for symbol in symbols:
        subs.append({"type": "subscribe", "stream": "quotes", "symbol": symbol})
        if bars:
            subs.append({"type": "subscribe", "stream": "bars", "symbol": symbol, "interval": bars})
    if inbox:
        subs.append({"type": "subscribe", "stream": "inbox"})
    return subs


async def stream(
    url: str,
    token: str,
    subs: Sequence[dict[str, Any]],
    on_frame: Callable[[dict[str, Any]], None],
    *,
    count: int | None = None,
    kinds: frozenset[str] = frozenset({"quote", "bar", "inbox"}),
) -> int:
    """Connect, subscribe, hand every frame to ``on_frame``; stop after ``count`` data frames.

    Returns the number of data frames seen. The token travels in the
    Authorization header of the upgrade request, never in the URL.
    """
    seen = 0
    async with websockets.connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        open_timeout=10,
    ) as ws:
        for sub in subs:
            await ws.send(json.dumps(sub))
        async for raw in ws:
            frame = json.loads(raw)
            on_frame(frame)
            if frame.get("type") == "error" and frame.get("code") in (
                "unauthorized",
                "slow_consumer",
                "token_expired",
            ):
                break
            if frame.get("type") in kinds:
                seen += 1
                if count is not None and seen >= count:
                    break
    return seen
