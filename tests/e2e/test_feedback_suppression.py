"""Feedback suppression end to end: an address or number a provider reported is not used again.

The same real stack, worker processes (router, statestore, inapp,
delivery-email with the SendGrid fake, delivery-sms, audit, feedback), API
and provider fakes as :mod:`tests.e2e.test_privacy`, whose fixtures and
helpers this module reuses (each module still gets its own namespace,
database and workers). Two users with a verified address and the in-app
inbox: one address hard-bounces (a signed SendGrid event), the other
complains (an SES notification through SNS, signed). Their next
notification reaches the inbox, not the provider, and the router's audit
event and the funnel say the email channel was skipped.
"""

from __future__ import annotations

import asyncio
import json
import time
from functools import partial
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from finstream.api.deps import Resources
from finstream.api.webhooks import sign_sendgrid
from tests.e2e.test_privacy import (  # noqa: F401  (fixtures, found by name)
    api,
    audit_actions,
    fakes,
    keys,
    mail_to,
    notify,
    phone,
    prefs_of,
    running,
    sendgrid_key,
    settings,
    sms_to,
    sns,
    uid,
    until,
    verified_user,
)
from tests.fakes.delivery.kit import DeliveryFakes
from tests.fakes.delivery.sns import FakeSns, ses_event
from tests.support.api import Keys, auth
from tests.support.services import TestEnv, group_caught_up

pytestmark = pytest.mark.e2e

# What the router writes when every verified address of a user bounced, or complained
# (finstream.domain.notify.preferences_view.Preferences.contacts).
SKIPPED = {
    "bounced": "every verified email address bounced",
    "complained": "every verified email address complained",
}


async def router_decisions(res: Resources, request_id: str) -> list[dict[str, Any]]:
    rows = await res.pg.fetch(
        "SELECT action, reason, details FROM audit_events "
        "WHERE actor = 'router' AND subject_type = 'request' AND subject_id = $1 ORDER BY seq",
        request_id,
    )
    return [
        {
            "action": r["action"],
            "reason": r["reason"],
            "details": json.loads(r["details"]) if isinstance(r["details"], str) else r["details"],
        }
        for r in rows
    ]


async def inbox_with(client: httpx.AsyncClient, token: str, phrase: str) -> list[Any]:
    r = await client.get("/v1/users/me/inbox", headers=auth(token))
    assert r.status_code == 200, r.text
    return [m for m in r.json()["items"] if phrase in (m.get("body") or "")]


async def test_a_bounced_or_complained_address_gets_no_more_mail_but_the_inbox_does_and_the_skip_is_audited(
    api: tuple[httpx.AsyncClient, Resources],  # noqa: F811
    fakes: DeliveryFakes,  # noqa: F811
    keys: Keys,  # noqa: F811
    sns: FakeSns,  # noqa: F811
    sendgrid_key: ec.EllipticCurvePrivateKey,  # noqa: F811
    env: TestEnv,
) -> None:
    client, res = api
    service = keys.token("svc-suppression", roles=["service"])
    ann_mail, bea_mail = f"{uid('ann')}@example.com", f"{uid('bea')}@example.com"
    (ann, ann_token, _), (bea, bea_token, _) = await asyncio.gather(
        verified_user(client, fakes, keys, email=ann_mail),
        verified_user(client, fakes, keys, email=bea_mail),
    )

    # 1. The first notification goes by email (once) and to the inbox.
    first = {
        ann: await notify(client, service, ann, data={"title": "Statement", "body": "ann-one"}),
        bea: await notify(client, service, bea, data={"title": "Statement", "body": "bea-one"}),
    }

    def statements(address: str) -> list[dict[str, Any]]:
        return [m for m in mail_to(fakes, address) if m["subject"] == "Statement"]

    ann_first = (await until(lambda: asyncio.to_thread(statements, ann_mail), "ann's mail"))[0]
    bea_first = (await until(lambda: asyncio.to_thread(statements, bea_mail), "bea's mail"))[0]
    await until(lambda: inbox_with(client, ann_token, "ann-one"), "ann's first in-app message")
    await until(lambda: inbox_with(client, bea_token, "bea-one"), "bea's first in-app message")
    for user in (ann, bea):
        routed = await until(partial(router_decisions, res, first[user]), "audited")
        assert [d["action"] for d in routed] == ["routed"]
        assert routed[0]["details"]["channels"] == "email,inapp"
        assert not any(k.startswith("skipped.") for k in routed[0]["details"])
    # Everything ann and bea were mailed so far: the verification code and the statement.
    mailed = {a: len(await asyncio.to_thread(mail_to, fakes, a)) for a in (ann_mail, bea_mail)}
    assert mailed == {ann_mail: 2, bea_mail: 2}

    # 2. ann's address hard-bounces (SendGrid's signed event webhook), bea complains
    # (SES through SNS, signed): each address is flagged in the user's preferences.
    body = json.dumps(
        [{"event": "bounce", "sg_event_id": uid("b"), "message_id": ann_first["message_id"]}]
    ).encode()
    ts = str(int(time.time()))
    bounce = await client.post(
        "/v1/webhooks/sendgrid/events",
        content=body,
        headers={
            "content-type": "application/json",
            "X-Twilio-Email-Event-Webhook-Signature": sign_sendgrid(sendgrid_key, ts, body),
            "X-Twilio-Email-Event-Webhook-Timestamp": ts,
        },
    )
    assert bounce.json() == {"accepted": 1, "ignored": 0}, bounce.text
    doc = sns.notification(ses_event("Complaint", bea_first["message_id"], bea_mail))
    complaint = await client.post(
        "/v1/webhooks/ses/sns",
        content=json.dumps(doc),
        headers={"content-type": "text/plain", "x-amz-sns-message-type": doc["Type"]},
    )
    assert complaint.json() == {"accepted": 1, "ignored": 0}, complaint.text

    async def flagged(token: str, flag: str) -> dict[str, Any] | None:
        email = (await prefs_of(client, token))["emails"][0]
        return email if email[flag] else None

    ann_email = await until(lambda: flagged(ann_token, "bounced"), "ann's address bounced")
    bea_email = await until(lambda: flagged(bea_token, "complained"), "bea's address complained")
    # Still verified: the flag alone is what takes the address out of use.
    assert (ann_email["verified"], ann_email["complained"]) == (True, False)
    assert (bea_email["verified"], bea_email["bounced"]) == (True, False)
    # The API shows the new version as soon as it is on notify.preferences; the router
    # takes it from there asynchronously (another topic than the requests, so no order
    # between the two). A request sent before the router has it may still be mailed:
    # wait for the router's committed offsets to pass the change.
    await until(
        lambda: asyncio.to_thread(
            group_caught_up, env, env.settings.group("router"), ["notify.preferences"]
        ),
        "the router past the preference changes",
    )

    # 3. The next notification: the inbox gets it, the provider does not, and the router
    # says why.
    second = {
        ann: await notify(client, service, ann, data={"title": "Statement", "body": "ann-two"}),
        bea: await notify(client, service, bea, data={"title": "Statement", "body": "bea-two"}),
    }
    await until(lambda: inbox_with(client, ann_token, "ann-two"), "ann's second in-app message")
    await until(lambda: inbox_with(client, bea_token, "bea-two"), "bea's second in-app message")
    for user, cause in ((ann, "bounced"), (bea, "complained")):
        decisions = await until(
            partial(router_decisions, res, second[user]), "the second decision audited"
        )
        assert [d["action"] for d in decisions] == ["routed"], decisions
        details = decisions[0]["details"]
        assert details["channels"] == "inapp", details
        assert details["skipped.email"] == SKIPPED[cause], details
        assert details["contacts"].split(":")[0] == "inapp", details
        assert "," not in details["message_ids"], details

    # The router's decision, in one transaction with its outbound messages, is committed
    # and the inbox has what it sent; the delivery records agree that only the in-app
    # message was ever made of the request ...
    async def channels_of(request_id: str) -> list[str]:
        rows = await res.pg.fetch(
            "SELECT channel FROM deliveries WHERE request_id = $1 ORDER BY channel", request_id
        )
        return [r["channel"] for r in rows]

    for user in (ann, bea):
        # (deliveries keep the OutboundMessage's channel, upper case)
        assert await until(partial(channels_of, second[user]), "deliveries") == ["INAPP"]
    # ... so nothing more reached the provider for either address: still the code and the
    # first statement, one each.
    for address in (ann_mail, bea_mail):
        assert len(await asyncio.to_thread(statements, address)) == 1, address
    assert {a: len(await asyncio.to_thread(mail_to, fakes, a)) for a in mailed} == mailed

    # The funnel counts the email channel of each second request as suppressed.
    async def suppressed(request_id: str) -> dict[str, Any] | None:
        row = await res.pg.fetchrow(
            "SELECT * FROM notification_funnel WHERE item_key = $1", f"{request_id}|email"
        )
        return dict(row) if row and row["suppressed_at"] else None

    for user in (ann, bea):
        row = await until(partial(suppressed, second[user]), "the suppressed funnel row")
        assert (row["channel"], row["user_id"], row["message_id"]) == ("email", user, None)
        assert row["requested_at"] is not None
        assert row["sent_at"] is None
    operator = keys.token("ops-suppression", roles=["operator"])
    r = await client.get(
        "/v1/analytics/deliveries", params={"group_by": "channel"}, headers=auth(operator)
    )
    assert r.status_code == 200, r.text
    by_channel = {g["channel"]: g for g in r.json()["groups"]}
    assert by_channel["email"]["suppressed"] == 2, by_channel
    assert by_channel["inapp"]["suppressed"] == 0, by_channel


async def test_a_number_refused_on_send_as_opted_out_is_marked_by_the_feedback_role_and_not_texted_again(
    api: tuple[httpx.AsyncClient, Resources],  # noqa: F811
    fakes: DeliveryFakes,  # noqa: F811
    keys: Keys,  # noqa: F811
    env: TestEnv,
) -> None:
    """Twilio refuses a send with 21610 (the recipient replied STOP): the SMS worker only
    names it in the DeliveryResult; the feedback role marks the number, audited."""
    client, res = api
    service = keys.token("svc-stop", roles=["service"])
    number = phone()
    cy, cy_token, _ = await verified_user(
        client, fakes, keys, email=f"{uid('cy')}@example.com", number=number, consents=("sms",)
    )
    fakes.twilio.opted_out.add(number)
    texted = len(await asyncio.to_thread(sms_to, fakes, number))  # the verification code
    first = await notify(
        client, service, cy, category="security", channels=["SMS"], data={"title": "T", "body": "1"}
    )

    async def refused() -> list[Any] | None:
        rows = await res.pg.fetch(
            "SELECT status, error_class FROM delivery_results r JOIN deliveries d "
            "USING (message_id) WHERE d.request_id = $1",
            first,
        )
        return [tuple(r) for r in rows] or None

    assert await until(refused, "the refused send recorded") == [("REJECTED", "opted_out")]

    async def opted_out() -> bool:
        return bool((await prefs_of(client, cy_token))["phones"][0]["opted_out"])

    await until(opted_out, "the number marked opted out")

    async def audited() -> list[str] | None:
        actions = await audit_actions(res, cy)
        return actions if "feedback_phone_opted_out" in actions else None

    actions = await until(audited, "the change audited by the feedback role")
    assert "phone_opted_out" not in actions  # the delivery worker no longer writes preferences
    await until(
        lambda: asyncio.to_thread(
            group_caught_up, env, env.settings.group("router"), ["notify.preferences"]
        ),
        "the router past the preference change",
    )

    second = await notify(
        client, service, cy, category="security", channels=["SMS"], data={"title": "T", "body": "2"}
    )
    decisions = await until(partial(router_decisions, res, second), "the second decision audited")
    assert "sms" not in str(decisions[0]["details"].get("channels", "")), decisions
    assert len(await asyncio.to_thread(sms_to, fakes, number)) == texted
