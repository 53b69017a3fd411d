"""Which partition Kafka's default partitioner gives a key.

finstream co-partitions by key (ticks and rules by symbol; requests,
preferences and routing state by user id), so every producer must place a key
where the Java client's default partitioner (and librdkafka's
``murmur2_random``) would: ``toPositive(murmur2(key)) % partitions``.
"""

from __future__ import annotations

import functools

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (``org.apache.kafka.common.utils.Utils.murmur2``), unsigned 32 bit."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    end = length - length % 4
    for i in range(0, end, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    rest = length % 4
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


@functools.lru_cache(maxsize=262_144)
def key_partition(key: bytes, partitions: int) -> int:
    """The partition of ``key`` among ``partitions`` (Kafka's default partitioner)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
