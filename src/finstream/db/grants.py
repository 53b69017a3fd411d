"""Least privilege: which PostgreSQL group role each worker role connects as.

migrations/0040 creates the group roles (NOLOGIN) and grants each only what
its workers touch. A deployment creates one login user per group
(``CREATE ROLE fs_history LOGIN PASSWORD '...' IN ROLE finstream_history``)
and gives each worker role the URL of its own user; roles that never touch
PostgreSQL get no database URL at all. Migrations, partition maintenance,
retention and backups use a member of ``finstream_owner``.

For development, :func:`provision_dev_logins` creates login users named
after their group with a password derived from the name, on the local stack
only (``FINSTREAM_ENV=dev``), and :func:`role_database_url` builds each
worker's URL from the owner's.
"""

from __future__ import annotations

import contextlib
from urllib.parse import quote, urlparse, urlunparse

import asyncpg

OWNER = "finstream_owner"

# worker role -> group role; roles absent here do not use PostgreSQL.
WORKER_DB_ROLES: dict[str, str] = {
    "history": "finstream_history",
    "bars": "finstream_bars",
    "audit": "finstream_audit",
    "delivery-email": "finstream_delivery",
    "delivery-push": "finstream_delivery",
    "delivery-sms": "finstream_delivery",
    # issue 14: the in-app worker runs the delivery engine (deliveries, user keys),
    # the router seals with users' keys, the feedback role keeps the funnel.
    "inapp": "finstream_delivery",
    "router": "finstream_router",
    "feedback": "finstream_feedback",
    "api": "finstream_api",
    "retention": OWNER,
}

GROUPS = sorted(set(WORKER_DB_ROLES.values()))


def dev_login(group: str) -> tuple[str, str]:
    """(user, password) of the development login user of a group role."""
    user = group.replace("finstream_", "fs_")
    return user, f"{user}-dev"


def role_database_url(owner_url: str, group: str) -> str:
    """The owner's URL with the development login of ``group`` in place of the owner's."""
    user, password = dev_login(group)
    parsed = urlparse(owner_url)
    host = parsed.hostname or "127.0.0.1"
    netloc = f"{quote(user)}:{quote(password)}@{host}" + (f":{parsed.port}" if parsed.port else "")
    return urlunparse(parsed._replace(netloc=netloc))


async def provision_dev_logins(conn: asyncpg.Connection) -> list[str]:
    """Create (or re-key) the development login users; return their names."""
    made = []
    for group in GROUPS:
        user, password = dev_login(group)
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", user)
        verb = "ALTER" if exists else "CREATE"
        # Passwords cannot be bind parameters in DDL; this one is derived from a fixed name.
        # Created concurrently by another environment on the same cluster: fine.
        with contextlib.suppress(asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
            await conn.execute(f"{verb} ROLE {user} LOGIN PASSWORD '{password}'")
        await conn.execute(f"GRANT {group} TO {user}")
        made.append(user)
    return made
