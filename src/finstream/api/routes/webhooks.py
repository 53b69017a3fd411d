"""Provider webhooks feeding ``notify.delivery`` (see :mod:`finstream.api.webhooks`).

A request whose signature does not verify is refused (403) before its body
is interpreted. A verified event that cannot be attributed to a message goes
to ``dlq`` with the reason; interim statuses are counted and acknowledged.
The answer (200) waits for Kafka's acknowledgement, so a provider retries
what we could not store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import MultiDict
from twilio.request_validator import RequestValidator, get_signature_algorithm

from finstream.api import ses_sns
from finstream.api.deps import Res, Resources, correlation_id
from finstream.api.metrics import WEBHOOK_EVENTS
from finstream.api.models import WebhookAck
from finstream.api.problems import Problem, problem_responses
from finstream.api.webhooks import (
    ID_FIELDS,
    SENDGRID_SIGNATURE,
    SENDGRID_TIMESTAMP,
    TWILIO_SIGNATURE,
    TWILIO_SIGNATURE_SETTINGS,
    ProviderEvent,
    SignatureError,
    Unattributable,
    attempt_of,
    known_ids,
    load_sendgrid_key,
    sendgrid_event,
    twilio_event,
    verify_sendgrid,
)
from finstream.domain.delivery.channels import scrub_contacts
from finstream.domain.time import utcnow
from finstream.runtime.kafka import correlation_header
from finstream.runtime.logging import get_logger

log = get_logger(__name__)
router = APIRouter(tags=["webhooks"])


def _signed_url(request: Request, public_url: str | None) -> str:
    if public_url is None:
        return str(request.url)
    query = request.url.query
    return public_url.rstrip("/") + request.url.path + (f"?{query}" if query else "")


_LOOKUP_BY_MESSAGE = """
SELECT message_id, request_id, user_id, attempts FROM deliveries WHERE message_id = $1
"""
_LOOKUP_BY_PROVIDER_ID = """
SELECT message_id, request_id, user_id, attempts FROM deliveries
WHERE provider = $1 AND provider_message_id = $2
"""


async def attribute(
    res: Resources, event: ProviderEvent, attached: dict[str, str]
) -> tuple[dict[str, str], int | None] | Unattributable:
    """Complete the ids the sender attached from the ``deliveries`` table."""
    if all(name in attached for name in ID_FIELDS):
        return attached, None
    try:
        if "message_id" in attached:
            row = await res.pg.fetchrow(_LOOKUP_BY_MESSAGE, attached["message_id"])
        elif event.provider_message_id:
            row = await res.pg.fetchrow(
                _LOOKUP_BY_PROVIDER_ID, event.provider, event.provider_message_id
            )
        else:
            return Unattributable("no message_id attached and no provider message id")
    except asyncpg.UndefinedTableError:
        return Unattributable("ids not attached and no deliveries table to look them up")
    if row is None:
        return Unattributable("no delivery of ours matches this event")
    found = {name: str(row[name]) for name in ID_FIELDS}
    # What the sender attached to a signed event wins over nothing; the table fills the gaps.
    return {**found, **attached}, int(row["attempts"]) or None


async def _emit(
    res: Resources,
    request: Request,
    provider: str,
    items: Sequence[tuple[bytes, ProviderEvent | Unattributable | None, dict[str, Any]]],
) -> JSONResponse:
    """Publish each attributable event; dead-letter the rest; wait for Kafka."""
    results = res.topic("notify.delivery")
    topic = results.name
    headers = correlation_header(correlation_id(request))
    accepted = ignored = 0
    for raw, event, attached in items:
        outcome: ProviderEvent | Unattributable | None = event
        ids: tuple[dict[str, str], int | None] | Unattributable | None = None
        if isinstance(event, ProviderEvent):
            ids = await attribute(res, event, known_ids(attached))
            if isinstance(ids, Unattributable):
                outcome = ids
        if outcome is None:
            ignored += 1
            WEBHOOK_EVENTS.labels(provider, "interim").inc()
        elif isinstance(outcome, Unattributable):
            ignored += 1
            WEBHOOK_EVENTS.labels(provider, "dead_letter").inc()
            await res.dead_letters.send(
                source_topic=f"webhook:{provider}",
                partition=-1,
                offset=-1,
                key=None,
                # Nobody's key can seal it (it is nobody's we know): addresses masked instead.
                value=scrub_contacts(raw.decode("utf-8", "replace")).encode(),
                error=outcome.reason,
                error_class="UnattributableEvent",
            )
        else:
            assert isinstance(ids, tuple)
            found, attempts = ids
            attempt = attempt_of(attached.get("attempt", attached.get("delivery_attempt")))
            result = outcome.result(found, attempts if attempt == 1 and attempts else attempt)
            accepted += 1
            WEBHOOK_EVENTS.labels(provider, "accepted").inc()
            await res.publisher.send(
                topic,
                result["user_id"].encode(),
                results.encode(result),
                headers,
            )
    try:
        await res.publisher.flush()
    except Exception as exc:
        log.warning("webhook events not stored", provider=provider, error=str(exc))
        raise Problem(
            503, "The events could not be stored; retry.", headers={"Retry-After": "5"}
        ) from None
    return JSONResponse(WebhookAck(accepted=accepted, ignored=ignored).model_dump())


@router.post(
    "/v1/webhooks/twilio/status",
    response_model=WebhookAck,
    summary="Twilio SMS status callback (form-encoded, X-Twilio-Signature)",
    responses=problem_responses(400, 403, 413, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "MessageSid": {"type": "string"},
                            "MessageStatus": {"type": "string"},
                            "ErrorCode": {"type": "string"},
                        },
                    }
                }
            },
        },
        "parameters": [
            {
                "name": TWILIO_SIGNATURE,
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
            }
        ],
    },
)
async def twilio_status(request: Request, res: Res) -> Any:
    token = res.settings.api_twilio_auth_token
    if token is None:
        raise Problem(403, "Twilio callbacks are not configured on this server.")
    signature = request.headers.get(TWILIO_SIGNATURE)
    body = await request.body()
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        pairs = None
    if not signature or pairs is None:
        WEBHOOK_EVENTS.labels("twilio", "bad_signature").inc()
        raise Problem(403, "The request is not signed by Twilio.")
    validator = RequestValidator(token.get_secret_value())
    algorithm = get_signature_algorithm(request.headers.get(TWILIO_SIGNATURE_SETTINGS))
    url = _signed_url(request, res.settings.api_public_url)
    if not validator.validate(url, MultiDict(pairs), signature, algorithm):
        WEBHOOK_EVENTS.labels("twilio", "bad_signature").inc()
        raise Problem(403, "The request is not signed by Twilio.")
    event = twilio_event(dict(pairs), utcnow())
    return await _emit(res, request, "twilio", [(body, event, dict(request.query_params))])


@router.post(
    "/v1/webhooks/sendgrid/events",
    response_model=WebhookAck,
    summary="SendGrid Event Webhook (JSON array, ECDSA signature)",
    responses=problem_responses(400, 403, 413, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "array", "items": {"type": "object"}}}
            },
        },
        "parameters": [
            {
                "name": SENDGRID_SIGNATURE,
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
            },
            {
                "name": SENDGRID_TIMESTAMP,
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
            },
        ],
    },
)
async def sendgrid_events(request: Request, res: Res) -> Any:
    key_text = res.settings.api_sendgrid_webhook_public_key
    if key_text is None:
        raise Problem(403, "SendGrid events are not configured on this server.")
    key = load_sendgrid_key(key_text)
    body = await request.body()
    try:
        verify_sendgrid(
            key,
            request.headers.get(SENDGRID_SIGNATURE),
            request.headers.get(SENDGRID_TIMESTAMP),
            body,
        )
    except SignatureError as exc:
        WEBHOOK_EVENTS.labels("sendgrid", "bad_signature").inc()
        raise Problem(403, f"The request is not signed by SendGrid ({exc}).") from None
    try:
        events = json.loads(body)
    except ValueError:
        raise Problem(400, "The body is not JSON.") from None
    if not isinstance(events, list):
        raise Problem(400, "The body must be a JSON array of events.")
    now = utcnow()
    items = [
        (
            json.dumps(e, separators=(",", ":")).encode(),
            sendgrid_event(e, now),
            # SendGrid's own "attempt" counts its retries of a deferred mail, not ours.
            {k: v for k, v in e.items() if k != "attempt"} if isinstance(e, dict) else {},
        )
        for e in events
    ]
    return await _emit(res, request, "sendgrid", items)


# -- SES through SNS (issue 14) -------------------------------------------------------------

_CERTS: dict[str, bytes] = {}  # SigningCertURL -> PEM; SNS rotates certificates rarely


async def _certificate(url: str) -> bytes:
    cached = _CERTS.get(url)
    if cached is not None:
        return cached
    async with httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client:
        response = await client.get(url)
    if response.status_code != 200:
        raise ses_sns.SnsError(f"signing certificate unavailable ({response.status_code})")
    if len(_CERTS) > 32:
        _CERTS.clear()
    _CERTS[url] = response.content
    return response.content


@router.post(
    "/v1/webhooks/ses/sns",
    response_model=WebhookAck,
    summary="SES notifications through an SNS HTTP(S) subscription (SNS signature)",
    description="SNS posts Notification, SubscriptionConfirmation and UnsubscribeConfirmation "
    "messages (JSON, `Content-Type: text/plain`). The signature is verified with the "
    "certificate at `SigningCertURL` (which must be SNS's) and the topic must be one of "
    "`FINSTREAM_API_SNS_TOPIC_ARNS`; a subscription to such a topic is confirmed. Each SES "
    "event (send, delivery, bounce, complaint, reject, open, click, subscription) becomes a "
    "DeliveryResult on notify.delivery, which the feedback role acts on.",
    responses=problem_responses(400, 403, 413, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        "parameters": [
            {
                "name": ses_sns.MESSAGE_TYPE_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "string", "enum": list(ses_sns.TYPES)},
            }
        ],
    },
)
async def ses_sns_events(request: Request, res: Res) -> Any:
    topics = {t.strip() for t in res.settings.api_sns_topic_arns.split(",") if t.strip()}
    if not topics:
        raise Problem(403, "SES notifications are not configured on this server.")
    body = await request.body()
    try:
        doc = ses_sns.parse(body)
        ses_sns.check_origin(doc, res.settings.api_sns_cert_url_pattern, topics)
        ses_sns.verify(doc, await _certificate(str(doc["SigningCertURL"])))
    except ses_sns.SnsError as exc:
        WEBHOOK_EVENTS.labels("ses", "bad_signature").inc()
        raise Problem(403, f"The request is not a signed SNS message of ours ({exc}).") from None
    except httpx.HTTPError:
        raise Problem(
            503, "The SNS signing certificate is unreachable; retry.", headers={"Retry-After": "5"}
        ) from None
    if doc["Type"] != "Notification":
        if doc["Type"] == "SubscriptionConfirmation" and res.settings.api_sns_confirm_subscriptions:
            url = str(doc.get("SubscribeURL") or "")
            if ses_sns.same_origin(url, str(doc["SigningCertURL"])):
                async with httpx.AsyncClient(timeout=10.0, follow_redirects=False) as client:
                    confirmed = await client.get(url)
                log.info(
                    "SNS subscription confirmed",
                    topic=doc["TopicArn"],
                    status=confirmed.status_code,
                )
        WEBHOOK_EVENTS.labels("ses", "interim").inc()
        return JSONResponse(WebhookAck(accepted=0, ignored=1).model_dump())
    try:
        message = json.loads(str(doc.get("Message") or ""))
    except ValueError:
        message = None
    event = ses_sns.ses_event(message, str(doc.get("MessageId") or ""), utcnow())
    attached = ses_sns.attached_ids(message) if isinstance(message, dict) else {}
    return await _emit(res, request, "ses", [(body, event, attached)])
