"""The router's side of scheduled notifications: commands in, held items out.

Kept beside :mod:`finstream.agents.router` (which calls it at three points)
so the router stays about routing. The decisions are pure, in
:mod:`finstream.domain.notify.scheduled`.

* ``notify.scheduled.commands`` (key: user id) is a third input of the
  router's exactly-once engine, co-partitioned with ``notify.requests``: a
  command is applied to the user's holds in the batch it arrives in, and the
  release timer runs between batches, so a cancel and the release of the same
  hold never overlap. Whichever comes first wins; the other is a no-op with
  an audited outcome (``already_released``; a released hold is gone, so a
  cancelled one is never sent). Invalid commands never get here (the engine's
  contract dead-letters them with the reason); a key that is not the
  command's user is dead-lettered too.
* ``notify.scheduled.items`` (compacted, key ``user/item``) gets, in the same
  transaction, every change of a user's held items: a record when an item is
  held or rescheduled, a tombstone (header ``finstream-scheduled-state``) when
  it is released, cancelled or forgotten. The statestore role keeps it in
  Redis for ``GET /v1/users/{user}/scheduled``.
* After an assignment (a start, a restart, a rebalance) the router announces
  again everything it holds on the partitions it got, from its restored
  store, in its first release tick: the read model heals if Redis lost it,
  and holds made before this topic existed are listed. (The store does not
  remember which holds were rescheduled: announced again, they read ``held``.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from finstream.agents.router_batch import Batch, Letter, Out
from finstream.domain.notify import scheduled as sched
from finstream.domain.notify.request import Request
from finstream.domain.notify.routing_state import Holds
from finstream.domain.time import utcnow
from finstream.runtime.kafka import correlation_header
from finstream.runtime.logging import correlation, get_logger
from finstream.runtime.stream.events import Event
from finstream.topics import contract

if TYPE_CHECKING:
    from finstream.agents.router import Router

log = get_logger(__name__)

COMMANDS = Counter(
    "finstream_router_schedule_commands_total", "Commands on held notifications", ["outcome"]
)
STATE_HEADER = "finstream-scheduled-state"


class ScheduleControl:
    def __init__(self, router: Router) -> None:
        self.router = router
        ns = router.settings.namespace
        self.commands = contract("notify.scheduled.commands", ns, router.codec)
        self.items = contract("notify.scheduled.items", ns, router.codec)
        self.commands_topic = self.commands.name
        if self.commands.partitions != router.partitions:
            raise ValueError("notify.scheduled.commands must have notify.requests' partitions")
        self._announce: frozenset[int] = frozenset()

    def assigned(self, partitions: frozenset[int]) -> None:
        self._announce = partitions

    def announce(self, out: Any) -> None:
        """Publish every item held on newly assigned partitions (once per assignment)."""
        if not self._announce:
            return
        partitions, self._announce = self._announce & self.router.owned, frozenset()
        now = utcnow()
        count = 0
        for partition in sorted(partitions):
            for _p, key, holds in self.router.holds_store.items(partition):
                user = key.decode()
                for item in sched.items(user, holds, self.describe).values():
                    record = item.record("HELD", now)
                    key_ = sched.item_key(user, item.item_id)
                    out.produce(self.items.name, key_, self.items.encode(record))
                    count += 1
        log.info("scheduled items announced", partitions=sorted(partitions), items=count)

    def describe(self, raw: bytes) -> sched.Described:
        request = Request.from_record(self.router.requests.decode_record(raw))
        return sched.Described(
            request.category, request.template, request.priority, request.channels
        )

    def command(self, ev: Event, headers: list[tuple[str, bytes]], batch: Batch) -> None:
        command: sched.Command = ev.item
        if ev.key != command.user_id.encode():
            batch.letters.append(
                Letter(
                    ev.topic,
                    ev.partition,
                    ev.offset,
                    ev.key,
                    ev.value,
                    f"key does not match user_id {command.user_id!r}",
                    headers,
                    "InvalidKey",
                )
            )
            return
        router = self.router
        user = command.user_id
        now = utcnow()
        with correlation(command.correlation_id):
            result = sched.apply(
                command,
                router._holds(user, batch),
                router._state(user, batch),
                now,
                describe=self.describe,
                dedupe_seconds=router.policy.dedupe_seconds,
            )
            if result.outcome == sched.OUTCOME_CANCELLED:
                batch.cancelled.setdefault(user, {})[command.item_id] = command.command_id
            elif result.outcome == sched.OUTCOME_RESCHEDULED:
                batch.rescheduled.setdefault(user, {})[command.item_id] = command.command_id
            event = sched.audit_event(command, result, now)
            batch.outputs.append(
                Out(
                    router.audit_topic,
                    user.encode(),
                    router.audit.encode(event),
                    correlation_header(command.correlation_id),
                )
            )
            COMMANDS.labels(result.outcome).inc()
            log.info(
                "schedule command",
                command_id=command.command_id,
                user_id=user,
                item_id=command.item_id,
                outcome=result.outcome,
            )

    def publish(self, batch: Batch, out: Any) -> None:
        """Each changed held item of the batch's users onto notify.scheduled.items."""
        now = utcnow()
        for user, holds in batch.holds.items():
            self._publish_user(user, holds, batch, out, now)
        for user in batch.forgotten - set(batch.holds):
            self._publish_user(user, None, batch, out, now)

    def _publish_user(
        self, user: str, holds: Holds | None, batch: Batch, out: Any, now: Any
    ) -> None:
        router = self.router
        stored = router.holds_store.get(router._partition(user), user.encode())
        forgotten = user in batch.forgotten
        old, new = sched.changed_holds(stored, None if forgotten else holds)
        before = sched.items(user, old, self.describe)
        after = sched.items(user, new, self.describe)
        for change in sched.changes(
            before,
            after,
            cancelled=batch.cancelled.get(user),
            rescheduled=batch.rescheduled.get(user),
            forgotten=forgotten,
        ):
            key = sched.item_key(user, change.item_id)
            if change.item is None:
                out.produce(self.items.name, key, None, [(STATE_HEADER, change.state.encode())])
            else:
                record = change.item.record(change.state, now, change.command_id)
                out.produce(self.items.name, key, self.items.encode(record))
