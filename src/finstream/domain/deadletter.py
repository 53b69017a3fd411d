"""What a dead letter carries: the original bytes plus headers saying why.

Header names are part of the public contract (operators filter on them, the
``finstream dlq`` commands read them, redrive sends the value back to
``dlq.source.topic``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

H_SOURCE_TOPIC = "dlq.source.topic"
H_SOURCE_PARTITION = "dlq.source.partition"
H_SOURCE_OFFSET = "dlq.source.offset"
H_ERROR_CLASS = "dlq.error.class"
H_ERROR_MESSAGE = "dlq.error.message"
H_ROLE = "dlq.role"
H_AT = "dlq.at"
H_ATTEMPTS = "dlq.attempts"
DLQ_HEADER_PREFIX = "dlq."
MAX_REASON_CHARS = 2000


@dataclass(frozen=True)
class DeadLetter:
    source_topic: str
    source_partition: int
    source_offset: int
    error_class: str
    reason: str
    role: str
    at: datetime
    key: bytes | None
    value: bytes | None
    original_headers: tuple[tuple[str, bytes], ...] = ()
    attempts: int | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        # Earlier dlq.* headers are dropped so that a redriven message that
        # fails again records only its latest failure.
        kept = [(k, v) for k, v in self.original_headers if not k.startswith(DLQ_HEADER_PREFIX)]
        ours = [
            (H_SOURCE_TOPIC, self.source_topic.encode()),
            (H_SOURCE_PARTITION, str(self.source_partition).encode()),
            (H_SOURCE_OFFSET, str(self.source_offset).encode()),
            (H_ERROR_CLASS, self.error_class.encode()),
            (H_ERROR_MESSAGE, self.reason[:MAX_REASON_CHARS].encode("utf-8", "replace")),
            (H_ROLE, self.role.encode()),
            (H_AT, self.at.isoformat().encode()),
        ]
        if self.attempts is not None:
            ours.append((H_ATTEMPTS, str(self.attempts).encode()))
        return kept + ours


def parse_headers(
    headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...],
) -> dict[str, str]:
    """dlq.* headers of a dead letter as text, for display and redrive."""
    out: dict[str, str] = {}
    for key, value in headers:
        if key.startswith(DLQ_HEADER_PREFIX):
            out[key] = bytes(value or b"").decode("utf-8", "replace")
    return out
