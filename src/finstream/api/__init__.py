"""The finstream API: HTTP endpoints and live WebSocket streams (``finstream api``).

Layout: ``app.py`` builds the FastAPI app; ``deps.py`` holds the per-process
resources and the bearer-token dependency; ``auth.py`` verifies JWTs;
``policy.py`` decides who may touch whose data; ``problems.py`` renders every
error as RFC 9457 problem JSON; ``limits.py`` enforces body sizes and per-token
rate limits; ``idempotency.py`` implements ``Idempotency-Key``; ``hub.py`` and
``stream.py`` are the WebSocket fan-out; ``webhooks.py`` checks provider
signatures; ``routes/`` are the endpoints; ``service.py`` is the ``api``
worker role; ``cli.py`` the ``finstream api`` commands.

Read-after-write: the compacted topics ``alerts.rules`` and
``notify.preferences`` are the truth, and the ``statestore`` role copies them
into Redis read models asynchronously. The API therefore writes a record to
the topic (waiting for the broker's acknowledgement) and then the same record
to the read model. Both carry the same monotonic ``updated_at``, and the read
model never replaces a newer version with an older one (deletes leave a
version behind), so the statestore role replaying the record later changes
nothing, and a client reads its own write immediately. Writes to one
resource are serialized by a short Redis lock so that topic order follows
version order across API replicas.
"""
