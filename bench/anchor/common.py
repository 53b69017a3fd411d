"""What the anchors share: finstream's contract decoding and a progress counter.

The anchors import finstream's pure code (PYTHONPATH=src): the decoding and
validation of a topic's records and the domain logic are then identical to
what the finstream role runs, and the benchmark compares the engines.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from quixstreams.models.serializers import Deserializer

from finstream.topics import DecodeContext, contract


class ContractValue(Deserializer):
    """A finstream topic contract: Avro decode and validation into a domain object."""

    def __init__(self, name: str) -> None:
        self.contract = contract(name)
        self.ctx = DecodeContext(datetime.now(UTC), timedelta(days=3650))

    def __call__(self, value: bytes, ctx: Any) -> Any:
        return self.contract.decode(value, self.ctx)


class Progress:
    """Counts records; every 1,000 writes the count where the benchmark reads it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0

    def __call__(self, value: Any) -> None:
        self.count += 1
        if self.count % 1000 == 0:
            self.path.write_text(str(self.count))
