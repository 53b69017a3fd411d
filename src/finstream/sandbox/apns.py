"""Fake Apple Push Notification service: HTTP/2 only, over TLS with ALPN h2.

Served with the h2 state machine (the same package httpx uses for HTTP/2),
so a client that does not negotiate h2 is refused, as APNs refuses it.
POST /3/device/<token> checks what APNs checks: the provider token (an ES256
JWT with ``kid`` = key id, ``iss`` = team id, ``iat`` under an hour old), the
apns-topic, apns-push-type, the apns-id format and the payload (present,
with ``aps``, at most 4096 bytes). Answers 200 with ``apns-id``, or
``{"reason": ...}``: 400 BadDeviceToken / BadTopic / PayloadEmpty /
BadMessageId, 403 ExpiredProviderToken / InvalidProviderToken /
MissingProviderToken, 410 Unregistered (tokens in ``unregistered``), 413
PayloadTooLarge, 429 TooManyRequests, 503 ServiceUnavailable.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

import jwt
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, RequestReceived, StreamEnded, StreamReset
from h2.exceptions import ProtocolError

from finstream.sandbox.base import Faults, Recorder
from finstream.sandbox.tls import Certs

_TOKEN = re.compile(r"^[0-9a-fA-F]{64}$")
Reply = tuple[int, list[tuple[str, str]], bytes]


def _reason(status: int, reason: str, **extra: Any) -> Reply:
    body = json.dumps({"reason": reason, **extra}).encode()
    return status, [("content-type", "application/json")], body


class FakeApns:
    def __init__(
        self, certs: Certs, *, team_id: str, key_id: str, public_key: Any, topic: str
    ) -> None:
        self.recorder = Recorder()
        self.faults = Faults()
        self.certs = certs
        self.team_id = team_id
        self.key_id = key_id
        self.public_key = public_key
        self.topic = topic
        self.unregistered: set[str] = set()
        self.not_before = 0.0  # provider tokens issued before this are "expired"
        self.refused_non_h2 = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._protocols: set[_H2Server] = set()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _H2Server(self), host, port, ssl=self.certs.server_context(alpn=["h2"])
        )
        self.url = f"https://{host}:{self._server.sockets[0].getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for proto in list(self._protocols):
                proto.close()
            await self._server.wait_closed()

    async def respond(self, headers: dict[str, str], body: bytes) -> Reply | None:
        self.recorder.requests += 1
        kind = self.faults.next()
        self.recorder.faults_served[kind] += 1
        if kind == "timeout":
            await asyncio.sleep(self.faults.hang)
            return _reason(503, "ServiceUnavailable")
        if kind == "drop":
            return None
        path = headers.get(":path", "")
        if headers.get(":method") != "POST":
            return _reason(405, "MethodNotAllowed")
        if not path.startswith("/3/device/"):
            return _reason(404, "BadPath")
        device = path.removeprefix("/3/device/")
        problem = self._check_token(headers.get("authorization"))
        if problem or kind == "auth":
            return _reason(403, problem or "InvalidProviderToken")
        if kind == "throttle":
            return _reason(429, "TooManyRequests")
        if kind == "error":
            return _reason(503, "ServiceUnavailable")
        if headers.get("apns-topic") != self.topic:
            return _reason(400, "BadTopic" if headers.get("apns-topic") else "MissingTopic")
        if headers.get("apns-push-type") not in ("alert", "background", "voip", "liveactivity"):
            return _reason(400, "InvalidPushType")
        apns_id = headers.get("apns-id") or str(uuid.uuid4())
        try:
            uuid.UUID(apns_id)
        except ValueError:
            return _reason(400, "BadMessageId")
        if not _TOKEN.match(device):
            return _reason(400, "BadDeviceToken")
        if not body:
            return _reason(400, "PayloadEmpty")
        if len(body) > 4096:
            return _reason(413, "PayloadTooLarge")
        try:
            payload = json.loads(body)
            assert isinstance(payload.get("aps"), dict)
        except (ValueError, AssertionError, AttributeError):
            return _reason(400, "PayloadEmpty")
        if device in self.unregistered:
            return _reason(410, "Unregistered", timestamp=int(time.time() * 1000))
        self.recorder.take(
            payload.get("finstream_message_id"),
            token=device,
            apns_id=apns_id,
            collapse=headers.get("apns-collapse-id"),
            priority=headers.get("apns-priority"),
            payload=payload,
        )
        if kind == "accept_hang":
            await asyncio.sleep(self.faults.hang)
        return 200, [("apns-id", apns_id)], b""

    def _check_token(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.lower().startswith("bearer "):
            return "MissingProviderToken"
        token = authorization[7:]
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token, self.public_key, algorithms=["ES256"], options={"require": ["iss", "iat"]}
            )
        except jwt.PyJWTError:
            return "InvalidProviderToken"
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id:
            return "InvalidProviderToken"
        iat = float(claims["iat"])
        if iat < self.not_before or time.time() - iat > 3600:
            return "ExpiredProviderToken"
        return None


class _H2Server(asyncio.Protocol):
    def __init__(self, fake: FakeApns) -> None:
        self.fake = fake
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.tasks: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            self.fake.refused_non_h2 += 1
            transport.close()
            return
        self.fake._protocols.add(self)
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._protocols.discard(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self.streams[event.stream_id] = (dict(event.headers), bytearray())  # type: ignore[arg-type]
            elif isinstance(event, DataReceived):
                if event.stream_id in self.streams:
                    self.streams[event.stream_id][1].extend(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                task = asyncio.ensure_future(self._answer(event.stream_id))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(event, StreamReset):
                self.streams.pop(event.stream_id, None)
            elif isinstance(event, ConnectionTerminated):
                self.transport.close()
        self.transport.write(self.conn.data_to_send())

    async def _answer(self, stream_id: int) -> None:
        request = self.streams.pop(stream_id, None)
        if request is None or self.transport is None:
            return
        reply = await self.fake.respond(request[0], bytes(request[1]))
        if self.transport.is_closing():
            return
        if reply is None:  # "drop": the connection goes away with no answer
            self.transport.close()
            return
        status, headers, body = reply
        try:
            self.conn.send_headers(
                stream_id, [(":status", str(status)), *headers], end_stream=not body
            )
            if body:
                self.conn.send_data(stream_id, body, end_stream=True)
        except ProtocolError:
            return  # the client reset the stream (it timed out)
        self.transport.write(self.conn.data_to_send())
