"""Privacy (issue 14): users' data keys, erasure and export, verification, feedback.

The pure parts (the token format, verification codes, unsubscribe tokens,
feedback classification, the funnel) live in :mod:`finstream.domain`; this
package holds what talks to PostgreSQL, Redis, Kafka and key services.
"""
