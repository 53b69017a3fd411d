"""GapGuard: offsets the faust consumer skipped are read back from Kafka, in order."""

from __future__ import annotations

from dataclasses import dataclass

from finstream.agents.gaps import GapGuard
from tests.support.services import TestEnv


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int


async def test_skipped_offsets_are_read_back_in_order(env: TestEnv) -> None:
    topic = env.topic("md.ticks")
    env.produce("md.ticks", [(b"k", f"v{i}".encode()) for i in range(30)])
    # All 30 went to one partition (one key); find it.
    part = next(m.partition() for m in env.consume_all("md.ticks", min_count=30))
    guard = GapGuard(env.settings, "test")
    try:
        assert await guard.missing(Msg(topic, part, 0)) == []
        assert await guard.missing(Msg(topic, part, 1)) == []
        # The consumer jumps from 1 to 7: 2..6 were skipped.
        missed = await guard.missing(Msg(topic, part, 7))
        assert [r.offset for r in missed] == [2, 3, 4, 5, 6]
        assert [r.value for r in missed] == [b"v2", b"v3", b"v4", b"v5", b"v6"]
        assert all(r.topic == topic and r.partition == part for r in missed)
        # A replay from an earlier offset (a seek back to the committed offset)
        # is not a gap, and neither is the stream catching up again.
        assert await guard.missing(Msg(topic, part, 3)) == []
        assert await guard.missing(Msg(topic, part, 4)) == []
        # Other partitions are tracked on their own.
        assert await guard.missing(Msg(topic, (part + 1) % 6, 100)) == []
        missed = await guard.missing(Msg(topic, part, 29))
        assert [r.offset for r in missed] == list(range(5, 29))
    finally:
        await guard.stop()
