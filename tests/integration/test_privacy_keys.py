"""Users' data keys in a real PostgreSQL: creation, cache, erasure, rotation, master rotation."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid

import asyncpg
import pytest

from finstream.domain.envelope import KeyUnavailable, UserErased
from finstream.privacy.keys import KeyRing
from finstream.privacy.kms import LocalMasterKeys, PrivacyConfigError, master_keys
from tests.support.services import TestEnv

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def local(*ids: str) -> tuple[LocalMasterKeys, dict[str, bytes]]:
    keys = {i: os.urandom(32) for i in ids}
    text = ",".join(f"{i}:{base64.b64encode(k).decode()}" for i, k in keys.items())
    return LocalMasterKeys.parse(text), keys


async def _reset_other_keys(env: TestEnv) -> None:
    conn = await asyncpg.connect(env.settings.database_url.get_secret_value())
    try:
        await conn.execute("DELETE FROM user_keys")
    finally:
        await conn.close()


async def _pool(env: TestEnv) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        env.settings.database_url.get_secret_value(), min_size=1, max_size=4
    )


async def test_first_seal_creates_one_key_that_every_worker_agrees_on(env: TestEnv) -> None:
    master, _ = local("m1")
    pool = await _pool(env)
    try:
        rings = [KeyRing(pool, master) for _ in range(4)]
        users = [f"u-{uuid.uuid4().hex[:6]}" for _ in range(20)]
        loaded = await asyncio.gather(*(r.load(users, create=True) for r in rings))
        # Each ring keeps the key it stored or, if another ring stored first, that one.
        for user in users:
            token = loaded[0][user].seal_text("ann@example.com")
            for found in loaded:
                assert found[user].open_text(token) == "ann@example.com"
        rows = await pool.fetchval(
            "SELECT count(*) FROM user_keys WHERE user_id = ANY($1::text[])", users
        )
        assert rows == 20
        wrapped = await pool.fetchval("SELECT wrapped FROM user_keys WHERE user_id = $1", users[0])
        # Stored wrapped: nonce, the 32-byte key encrypted, the tag.
        assert len(bytes(wrapped)) == 12 + 32 + 16
        # Without create, a user that has none gets none (and nothing is cached).
        fresh = KeyRing(pool, master)
        nobody = await fresh.get("never-seen")
        assert not nobody.keys
        assert not nobody.erased
        assert fresh.cached("never-seen") is None
    finally:
        await pool.close()


async def test_keys_are_cached_for_their_lifetime_then_read_again(env: TestEnv) -> None:
    master, _ = local("m1")
    pool = await _pool(env)
    clock = Clock()
    try:
        ring = KeyRing(pool, master, ttl=60, clock=clock)
        user = f"u-{uuid.uuid4().hex[:6]}"
        keys = await ring.get(user, create=True)
        assert ring.cached(user) is keys
        clock.now += 59
        assert ring.cached(user) is keys
        clock.now += 2
        assert ring.cached(user) is None
        again = await ring.get(user)
        assert again.open_text(keys.seal_text("x")) == "x"
    finally:
        await pool.close()


async def test_erasure_destroys_the_keys_and_no_worker_gets_new_ones(env: TestEnv) -> None:
    master, _ = local("m1")
    pool = await _pool(env)
    clock = Clock()
    try:
        writer = KeyRing(pool, master, ttl=60, clock=clock)
        other = KeyRing(pool, master, ttl=60, clock=clock)
        user = f"u-{uuid.uuid4().hex[:6]}"
        token = (await writer.get(user, create=True)).seal_text("ann@example.com")
        assert (await other.get(user)).open_text(token) == "ann@example.com"
        async with pool.acquire() as conn:
            assert await writer.erase(conn, user, "test", 90) is True
            assert await writer.erase(conn, user, "test", 90) is False  # idempotent
        assert await pool.fetchval("SELECT count(*) FROM user_keys WHERE user_id=$1", user) == 0
        # The eraser knows at once; a fresh reader too; creating is refused.
        with pytest.raises(KeyUnavailable):
            (await writer.get(user)).open_text(token)
        fresh = KeyRing(pool, master)
        with pytest.raises(KeyUnavailable):
            (await fresh.get(user, create=True)).open_text(token)
        with pytest.raises(UserErased):
            await fresh.seal_keys(user)
        # A worker that cached the key before keeps it only until its cache lapses.
        assert (await other.get(user)).open_text(token) == "ann@example.com"
        clock.now += 61
        with pytest.raises(KeyUnavailable):
            (await other.get(user)).open_text(token)
        # A key slipped in by a racing creator is never used: erased_users wins.
        await pool.execute(
            "INSERT INTO user_keys (user_id, version, master_key_id, wrapped) "
            "VALUES ($1, 1, 'm1', '\\x00')",
            user,
        )
        assert (await KeyRing(pool, master).get(user)).erased
    finally:
        await pool.close()


async def test_a_rotated_user_key_seals_new_data_and_still_opens_old(env: TestEnv) -> None:
    master, _ = local("m1")
    pool = await _pool(env)
    try:
        ring = KeyRing(pool, master)
        user = f"u-{uuid.uuid4().hex[:6]}"
        old = (await ring.get(user, create=True)).seal_text("old")
        assert await ring.rotate(user) == 2
        keys = await ring.get(user)
        new = keys.seal_text("new")
        assert new.startswith("fse1:2:")
        assert old.startswith("fse1:1:")
        assert keys.open_text(old) == "old"
        assert keys.open_text(new) == "new"
        async with pool.acquire() as conn:
            await ring.erase(conn, user, "test", 90)
        with pytest.raises(UserErased):
            await ring.rotate(user)
    finally:
        await pool.close()


async def test_master_key_rotation_rewraps_every_key_and_data_still_opens(env: TestEnv) -> None:
    # Ids of its own: the other tests' keys share the table (and would not open).
    m1, m2 = f"m1{uuid.uuid4().hex[:6]}", f"m2{uuid.uuid4().hex[:6]}"
    await _reset_other_keys(env)
    old_master, raw = local(m1)
    pool = await _pool(env)
    try:
        users = [f"u-{uuid.uuid4().hex[:6]}" for _ in range(7)]
        ring = KeyRing(pool, old_master)
        loaded = await ring.load(users, create=True)
        tokens = {u: loaded[u].seal_text(f"secret of {u}") for u in users}
        # The new master key goes first; the old one stays until the re-wrap is done.
        new = os.urandom(32)
        both = LocalMasterKeys.parse(
            f"{m2}:{base64.b64encode(new).decode()},{m1}:{base64.b64encode(raw[m1]).decode()}"
        )
        moved = await KeyRing(pool, both).rewrap(batch=3)
        assert moved >= len(users)
        ids = await pool.fetch(
            "SELECT DISTINCT master_key_id FROM user_keys WHERE user_id = ANY($1::text[])", users
        )
        assert {r["master_key_id"] for r in ids} == {m2}
        only_new = LocalMasterKeys.parse(f"{m2}:{base64.b64encode(new).decode()}")
        reread = await KeyRing(pool, only_new).load(users)
        for u in users:
            assert reread[u].open_text(tokens[u]) == f"secret of {u}"
    finally:
        await pool.close()


def test_production_refuses_to_start_without_master_keys(env: TestEnv) -> None:
    with pytest.raises(PrivacyConfigError, match="FINSTREAM_PRIVACY_MASTER_KEYS is required"):
        master_keys(env.settings.model_copy(update={"env": "production"}))
    for bad in ("m1", "m1:notbase64!", "m1:" + base64.b64encode(b"short").decode(), " , "):
        with pytest.raises(PrivacyConfigError):
            LocalMasterKeys.parse(bad)
    assert master_keys(env.settings).current_id == "dev"


def test_the_readme_rotation_from_the_command_line(env: TestEnv) -> None:
    """`finstream keys rotate`, then the master key procedure: new key first, `keys rewrap`,
    `keys status` shows nothing left under the old one, the old one dropped."""
    import subprocess
    import sys

    def cli(*args: str, masters: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "finstream.cli", "keys", *args],
            env=env.env(privacy_master_keys=masters),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    m1, m2 = f"c1{uuid.uuid4().hex[:6]}", f"c2{uuid.uuid4().hex[:6]}"
    asyncio.run(_reset_other_keys(env))
    old = f"{m1}:{base64.b64encode(os.urandom(32)).decode()}"
    new = f"{m2}:{base64.b64encode(os.urandom(32)).decode()}"
    user = f"u-{uuid.uuid4().hex[:6]}"

    async def seal(masters: str) -> str:
        pool = await _pool(env)
        try:
            keys = await KeyRing(pool, LocalMasterKeys.parse(masters)).load([user], create=True)
            return keys[user].seal_text("before the rotation")
        finally:
            await pool.close()

    async def opens(masters: str, token: str) -> tuple[str, int]:
        pool = await _pool(env)
        try:
            keys = (await KeyRing(pool, LocalMasterKeys.parse(masters)).load([user]))[user]
            return keys.open_text(token), keys.current or 0
        finally:
            await pool.close()

    token = asyncio.run(seal(old))
    assert "1 users have a new data key version" in cli("rotate", user, masters=old)
    assert asyncio.run(opens(old, token)) == ("before the rotation", 2)
    assert f"master {m1} (current): 2 keys of 1 users" in cli("status", masters=old)
    assert "2 keys re-wrapped under master key " + m2 in cli("rewrap", masters=f"{new},{old}")
    status = cli("status", masters=f"{new},{old}")
    assert f"master {m2} (current): 2 keys of 1 users" in status
    assert m1 not in status
    assert asyncio.run(opens(new, token)) == ("before the rotation", 2)
