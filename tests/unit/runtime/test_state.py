"""The stream engine's state store: what its changelog carries rebuilds exactly what it held."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from finstream.runtime.state import Store

ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "delete"]),
        st.integers(0, 3),  # partition
        st.sampled_from([b"a", b"b", b"c", b"d"]),
        st.integers(0, 100),
    ),
    max_size=60,
)


def _store() -> Store[int]:
    return Store("s", lambda v: str(v).encode(), int)


@given(st.lists(ops, max_size=5))
def test_replaying_the_drained_changelog_rebuilds_the_store(commits: list[list[tuple]]) -> None:
    live, log = _store(), []
    for commit in commits:
        for op, p, key, value in commit:
            if op == "put":
                live.put(p, key, value)
            else:
                live.delete(p, key)
        log.extend(live.drain_dirty())
        assert not live.dirty
    restored = _store()
    for p in live.partitions | {p for p, _k, _v in log}:
        restored.start_restore(p)
    for p, key, raw in log:
        restored.load(p, key, raw)
    restored.finish_restore()
    assert sorted(restored.items()) == sorted(live.items())


def test_a_key_changed_many_times_between_commits_is_written_once() -> None:
    store = _store()
    for n in range(1000):
        store.put(0, b"k", n)
    assert list(store.drain_dirty()) == [(0, b"k", b"999")]
    assert list(store.drain_dirty()) == []


def test_a_deleted_key_becomes_a_tombstone_and_dropped_partitions_are_forgotten() -> None:
    store = _store()
    store.put(1, b"k", 1)
    list(store.drain_dirty())
    store.delete(1, b"k")
    assert list(store.drain_dirty()) == [(1, b"k", None)]
    store.put(2, b"x", 5)
    store.drop([2])
    assert store.get(2, b"x") is None
    assert not store.dirty


def test_a_record_that_does_not_deserialize_is_skipped_not_fatal() -> None:
    store = _store()
    store.start_restore(0)
    store.load(0, b"bad", b"not a number")
    store.load(0, b"good", b"7")
    store.finish_restore()
    assert store.get(0, b"bad") is None
    assert store.get(0, b"good") == 7
