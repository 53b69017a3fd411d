"""Durability ordering: events acked only when all they wrote is delivered; held
writes applied per key, in order, after the outputs they depend on."""

from __future__ import annotations

import asyncio
from typing import Any

from finstream.agents.ordering import EventAck, KeyedWrites


class Event:
    def __init__(self) -> None:
        self.acked = 0

    def ack(self) -> bool:
        self.acked += 1
        return True


async def test_event_acked_only_when_sealed_unheld_and_delivered() -> None:
    loop = asyncio.get_running_loop()
    failures: list[BaseException] = []
    event = Event()
    ack = EventAck(event, failures.append)
    a, b = loop.create_future(), loop.create_future()
    ack.wait_for(a)
    ack.wait_for(b)
    ack.hold()
    a.set_result(1)
    await asyncio.sleep(0)
    ack.seal()
    assert event.acked == 0
    b.set_result(2)
    await asyncio.sleep(0)
    assert event.acked == 0  # still held
    ack.unhold()
    assert event.acked == 1
    assert failures == []


async def test_a_failed_delivery_is_reported_and_never_acked() -> None:
    loop = asyncio.get_running_loop()
    failures: list[BaseException] = []
    event = Event()
    ack = EventAck(event, failures.append)
    fut = loop.create_future()
    ack.wait_for(fut)
    ack.seal()
    fut.set_exception(RuntimeError("broker gone"))
    await asyncio.sleep(0)
    assert event.acked == 0
    assert [str(f) for f in failures] == ["broker gone"]


async def test_writes_wait_for_their_outputs_and_keep_their_order() -> None:
    loop = asyncio.get_running_loop()
    applied: list[str] = []

    def write(name: str) -> Any:
        def do() -> Any:
            applied.append(name)
            done = loop.create_future()
            done.set_result(None)
            return done

        return do

    held = KeyedWrites()
    first_out, second_out = loop.create_future(), loop.create_future()
    e1, e2, e3 = Event(), Event(), Event()
    a1, a2, a3 = (EventAck(e, lambda _exc: None) for e in (e1, e2, e3))
    held.hold(b"AAPL", 0, [first_out], [write("AAPL-1")], a1)
    held.hold(b"AAPL", 0, [second_out], [write("AAPL-2")], a2)
    # A key with nothing to wait for is written at once, whatever other keys do.
    held.hold(b"MSFT", 1, [], [write("MSFT-1")], a3)
    for a in (a1, a2, a3):
        a.seal()
    assert applied == ["MSFT-1"]
    assert held.blocked(b"AAPL")
    assert not held.blocked(b"MSFT")
    # The second output is delivered first: its write still waits for the first.
    second_out.set_result(None)
    await asyncio.sleep(0)
    assert applied == ["MSFT-1"]
    first_out.set_result(None)
    await asyncio.sleep(0)
    assert applied == ["MSFT-1", "AAPL-1", "AAPL-2"]
    assert (e1.acked, e2.acked, e3.acked) == (1, 1, 1)
    assert not held.blocked(b"AAPL")
    assert len(held) == 0


async def test_dropped_partitions_forget_their_writes_and_never_ack() -> None:
    loop = asyncio.get_running_loop()
    applied: list[str] = []
    held = KeyedWrites()
    out = loop.create_future()
    event = Event()
    ack = EventAck(event, lambda _exc: None)

    def do() -> Any:
        applied.append("x")
        return out

    held.hold(b"AAPL", 3, [out], [do], ack)
    ack.seal()
    assert held.drop_partitions({3}) == [b"AAPL"]
    out.set_result(None)
    await asyncio.sleep(0)
    assert applied == []
    assert event.acked == 0
    assert not held.blocked(b"AAPL")
