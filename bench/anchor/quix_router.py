"""The anchor of the router benchmark: routing decisions on Quix Streams.

    python quix_router.py BOOTSTRAP REQUESTS_TOPIC GROUP OUT_TOPIC STATE_DIR PROGRESS_FILE \
        PREFS_FILE KEYS_FILE

Each request (finstream's notify.requests contract) goes through finstream's
pure routing code as the router role runs it: ``decide`` against the user's
preferences and routing state (dedupe, caps, quiet hours), ``compose``
(templates rendered per channel and contact), ``remember``, one
OutboundMessage per message and an AuditEvent per decision, Avro-encoded to
OUT_TOPIC. The user's routing state and held requests live in Quix's state
store (exactly-once, default 5 s commits).

The privacy work is the router's too (issue 14): PREFS_FILE holds each user's
preferences as the router's store does, Avro with the contacts sealed, decoded
on a user's first request; the contacts of the channels a request may use are
opened with the user's data key, and each message is sealed
(:func:`finstream.domain.envelope.seal_outbound`). KEYS_FILE holds every
user's keys, unwrapped: the anchor is spared the router's PostgreSQL reads of
a user's keys on their first request. The router's rarer paths (digest
folding, the release timer) are left out: the benchmark's requests do not take
them.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any

from quixstreams import Application

from bench.anchor.common import ContractValue, Progress
from finstream.codec import Codec
from finstream.domain.envelope import CONTACT_FIELDS, UserKeys, is_sealed, seal_outbound
from finstream.domain.notify.audit import audit_event
from finstream.domain.notify.outbound import compose
from finstream.domain.notify.preferences import CHANNELS
from finstream.domain.notify.preferences_view import CHANNEL_CONTACTS, Preferences
from finstream.domain.notify.routing import Action, Policy, contact_channels, decide, remember
from finstream.domain.notify.routing_state import Hold, Holds, UserState
from finstream.domain.notify.templates import Limits, Templates
from finstream.domain.time import to_micros, utcnow
from finstream.resources import resource
from finstream.topics import contract


def open_contacts(prefs: Preferences, keys: UserKeys, channels: tuple[str, ...]) -> Preferences:
    """The contact lists of ``channels`` opened, as the router opens them."""
    wanted = {CHANNEL_CONTACTS[c] for c in channels if c in CHANNEL_CONTACTS}
    opened = {}
    for field, name in CONTACT_FIELDS:
        items = getattr(prefs, field)
        if field in wanted and items:
            opened[field] = tuple(
                {**item, name: keys.open_text(item[name])} if is_sealed(item.get(name)) else item
                for item in items
            )
    return prefs.with_contacts(opened) if opened else prefs


class Route:
    def __init__(self, prefs_file: str, keys_file: str) -> None:
        with open(prefs_file, "rb") as f:
            self.stored: dict[str, bytes] = pickle.load(f)
        with open(keys_file, "rb") as f:
            self.raw_keys: dict[str, dict[int, bytes]] = pickle.load(f)
        self.prefs: dict[str, Preferences] = {}
        self.keys: dict[str, UserKeys] = {}
        self.prefs_topic = contract("notify.preferences")
        self.policy = Policy()
        self.templates = Templates(resource("templates"), default_locale="en", limits=Limits())
        self.codec = Codec()

    def __call__(self, request: Any, state: Any) -> list[bytes]:
        now = utcnow()
        user = request.user_id
        prefs = self.prefs.get(user)
        if prefs is None:
            raw_prefs = self.stored.get(user)
            prefs = self.prefs[user] = (
                Preferences.from_record(self.prefs_topic.decode_record(raw_prefs))
                if raw_prefs is not None
                else Preferences.default(user)
            )
        keys = self.keys.get(user)
        if keys is None:
            keys = self.keys[user] = UserKeys.from_raw(user, self.raw_keys.get(user, {}))
        prefs = open_contacts(prefs, keys, contact_channels(request, prefs, self.policy))
        raw = state.get("u")
        us = UserState.from_bytes(raw.encode()) if raw is not None else UserState()
        us.prune(now.timestamp(), prefs, self.policy.max_seen)
        outcome = decide(request, prefs, us, now, self.policy)
        messages = []
        if outcome.send:
            messages, _missing = compose(
                request, prefs, outcome.send, templates=self.templates, policy=self.policy, now=now
            )
        if outcome.hold or outcome.hold_all:
            raw_holds = state.get("h")
            holds = Holds.from_bytes(raw_holds.encode()) if raw_holds else Holds()
            assert outcome.release_at is not None
            held = request.record if outcome.hold_all else request.with_channels(outcome.hold)
            holds.requests[request.request_id] = Hold(
                request.request_id,
                to_micros(outcome.release_at),
                outcome.hold_reason or "scheduled",
                self.codec.encode("NotificationRequest", held),
            )
            state.set("h", holds.to_bytes().decode())
        sent = [c for c in CHANNELS if any(m.channel == c for m in messages)]
        remember(outcome, request, us, now, self.policy, sent=sent)
        state.set("u", us.to_bytes().decode())
        out = [
            self.codec.encode("OutboundMessage", seal_outbound(m.message, keys)) for m in messages
        ]
        for d in outcome.decisions:
            event = audit_event(
                request,
                d,
                now,
                phase="intake",
                messages=messages if d.action is Action.ROUTED else (),
                skipped=dict(outcome.skipped),
            )
            out.append(self.codec.encode("AuditEvent", event))
        return out


def main(argv: list[str]) -> None:
    bootstrap, requests_name, group, out_name, state_dir, progress_path = argv[:6]
    prefs_file, keys_file = argv[6:8]
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        state_dir=state_dir,
        loglevel="WARNING",
    )
    requests = app.topic(
        requests_name, key_deserializer="str", value_deserializer=ContractValue("notify.requests")
    )
    out = app.topic(out_name, value_serializer="bytes")
    sdf = app.dataframe(requests).update(Progress(progress_path))
    sdf.apply(Route(prefs_file, keys_file), stateful=True, expand=True).to_topic(out)
    app.run()


if __name__ == "__main__":
    main(sys.argv[1:])
