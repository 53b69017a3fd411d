"""Master keys in AWS KMS (a fake speaking its JSON 1.1 protocol), users' keys in a real PostgreSQL."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from finstream.domain.envelope import EnvelopeError, wrap_context
from finstream.privacy.keys import KeyRing
from finstream.privacy.kms import (
    AwsKms,
    KmsError,
    LocalMasterKeys,
    MovingToKms,
    PrivacyConfigError,
    master_keys,
)
from tests.fakes.kms import FakeKms
from tests.support.services import TestEnv

pytestmark = pytest.mark.integration


@pytest.fixture
async def kms() -> AsyncIterator[FakeKms]:
    fake = FakeKms()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def client(fake: FakeKms, key_id: str, **kw: Any) -> AwsKms:
    options: dict[str, Any] = {"backoff": 0.001, **kw}
    return AwsKms(
        key_id=key_id,
        region=fake.region,
        access_key=options.pop("access_key", fake.access_key),
        secret_key=options.pop("secret_key", fake.secret_key),
        url=fake.url,
        **options,
    )


def kms_settings(env: TestEnv, fake: FakeKms, key_id: str, **update: Any) -> Any:
    return env.settings.model_copy(
        update={
            "privacy_kms": "aws-kms",
            "privacy_aws_kms_key_id": key_id,
            "privacy_aws_kms_region": fake.region,
            "privacy_aws_kms_url": fake.url,
            "privacy_aws_access_key_id": fake.access_key,
            "privacy_aws_secret_access_key": SecretStr(fake.secret_key),
            **update,
        }
    )


def requests_counted(action: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "finstream_privacy_kms_requests_total", {"action": action, "outcome": outcome}
    )
    return value or 0.0


async def _pool(env: TestEnv) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        env.settings.database_url.get_secret_value(), min_size=1, max_size=4
    )


async def test_a_key_kms_wrapped_opens_only_under_its_user_and_version(kms: FakeKms) -> None:
    arn = kms.create_key(alias="alias/finstream")
    master = client(kms, "alias/finstream")
    try:
        raw = os.urandom(32)
        key_id, blob = await master.wrap(raw, wrap_context("u1", 1))
        assert key_id == arn  # stored under the key, not the alias
        assert await master.current() == arn
        assert await master.unwrap(key_id, blob, wrap_context("u1", 1)) == raw
        tampered = blob[:-1] + bytes([blob[-1] ^ 1])
        for wrong_key, wrong_blob, context in (
            (key_id, blob, wrap_context("u2", 1)),
            (key_id, blob, wrap_context("u1", 2)),
            (key_id, tampered, wrap_context("u1", 1)),
        ):
            with pytest.raises(EnvelopeError, match="InvalidCiphertextException"):
                await master.unwrap(wrong_key, wrong_blob, context)
        other = kms.create_key()
        with pytest.raises(EnvelopeError, match="IncorrectKeyException"):
            await master.unwrap(other, blob, wrap_context("u1", 1))
        # Refusals of the ciphertext are answers, not outages: asked once each.
        assert kms.recorder.requests == 7
    finally:
        await master.close()


async def test_throttling_and_kms_failures_are_tried_again_until_answered(
    kms: FakeKms,
) -> None:
    kms.create_key(alias="alias/finstream")
    master = client(kms, "alias/finstream", attempts=5, timeout=2.0)
    try:
        key_id, blob = await master.wrap(b"k" * 32, wrap_context("u1", 1))
        before = kms.recorder.requests
        retried = requests_counted("Decrypt", "retried")
        kms.faults.hang = 0.01
        kms.faults.then("throttle", "error", "timeout", "drop")
        assert await master.unwrap(key_id, blob, wrap_context("u1", 1)) == b"k" * 32
        assert kms.recorder.requests - before == 5
        assert kms.errors == {
            "ThrottlingException": 1,
            "KMSInternalException": 1,
            "DependencyTimeoutException": 1,
        }
        assert requests_counted("Decrypt", "retried") - retried == 4
    finally:
        await master.close()


async def test_a_request_still_throttled_after_its_attempts_fails_with_the_reason(
    kms: FakeKms,
) -> None:
    kms.create_key(alias="alias/finstream")
    master = client(kms, "alias/finstream", attempts=3)
    try:
        kms.faults.mode = "throttle"
        with pytest.raises(KmsError, match=r"ThrottlingException.*gave up after 3 attempts"):
            await master.wrap(b"k" * 32, wrap_context("u1", 1))
        assert kms.recorder.requests == 3
    finally:
        await master.close()


async def test_refusals_are_not_tried_again(kms: FakeKms) -> None:
    arn = kms.create_key(alias="alias/finstream")
    cases = [
        (client(kms, "alias/finstream", secret_key="not-the-secret"), "IncorrectSignature"),
        (client(kms, "alias/finstream", access_key="AKIDOTHER"), "UnrecognizedClient"),
        (client(kms, "alias/missing"), "NotFoundException"),
    ]
    for master, code in cases:
        before = kms.recorder.requests
        try:
            with pytest.raises(KmsError, match=code) as caught:
                await master.wrap(b"k" * 32, wrap_context("u1", 1))
        finally:
            await master.close()
        assert caught.value.code.startswith(code)
        assert kms.recorder.requests - before == 1
    kms.disable(arn)
    master = client(kms, arn)
    try:
        with pytest.raises(KmsError, match="DisabledException"):
            await master.wrap(b"k" * 32, wrap_context("u1", 1))
    finally:
        await master.close()


async def test_a_key_ring_over_kms_wraps_and_unwraps_a_batch_in_parallel(
    env: TestEnv, kms: FakeKms
) -> None:
    arn = kms.create_key(alias="alias/finstream")
    pool = await _pool(env)
    users = [f"k-{uuid.uuid4().hex[:8]}" for _ in range(120)]
    ring = KeyRing(pool, client(kms, "alias/finstream", concurrency=8))
    try:
        loaded = await ring.load(users, create=True)
        assert kms.calls["Encrypt"] == 120
        assert 2 <= kms.max_in_flight <= 8
        tokens = {u: loaded[u].seal_text(f"secret of {u}") for u in users}
        stored = await pool.fetch(
            "SELECT DISTINCT master_key_id FROM user_keys WHERE user_id = ANY($1::text[])", users
        )
        assert [r["master_key_id"] for r in stored] == [arn]

        # A worker with a cold cache, under a quota it exceeds: throttled, tried again, done.
        kms.max_in_flight = 0
        kms.rate = 40.0
        cold = KeyRing(
            pool, client(kms, "alias/finstream", concurrency=8, backoff=0.05, attempts=10)
        )
        try:
            reread = await cold.load(users)
        finally:
            await cold.close()
        assert kms.calls["Decrypt"] == 120
        assert kms.errors["ThrottlingException"] > 0
        assert 2 <= kms.max_in_flight <= 8
        for u in users:
            assert reread[u].open_text(tokens[u]) == f"secret of {u}"
    finally:
        await ring.close()
        await pool.execute("DELETE FROM user_keys WHERE user_id = ANY($1::text[])", users)
        await pool.close()


async def _reset_keys(pool: asyncpg.Pool) -> None:
    # rewrap moves every stored key: the other tests' keys would not open here.
    await pool.execute("DELETE FROM user_keys")


async def test_an_alias_pointed_at_a_new_key_opens_old_keys_and_rewrap_moves_them(
    env: TestEnv, kms: FakeKms
) -> None:
    old = kms.create_key(alias="alias/finstream")
    pool = await _pool(env)
    await _reset_keys(pool)
    users = [f"a-{uuid.uuid4().hex[:8]}" for _ in range(9)]
    try:
        ring = KeyRing(pool, client(kms, "alias/finstream"))
        loaded = await ring.load(users, create=True)
        await ring.close()
        tokens = {u: loaded[u].seal_text(f"secret of {u}") for u in users}
        new = kms.create_key()
        kms.point("alias/finstream", new)
        ring = KeyRing(pool, client(kms, "alias/finstream"))
        try:
            assert await ring.master.current() == new
            reread = await ring.load(users)  # Decrypt names the old key, from the stored ARN
            assert all(reread[u].open_text(tokens[u]) == f"secret of {u}" for u in users)
            assert await ring.rewrap(batch=4) == len(users)
            assert await ring.rewrap() == 0
        finally:
            await ring.close()
        ids = await pool.fetch("SELECT DISTINCT master_key_id FROM user_keys")
        assert [r["master_key_id"] for r in ids] == [new]
        kms.disable(old)
        ring = KeyRing(pool, client(kms, "alias/finstream"))
        try:
            reread = await ring.load(users)
        finally:
            await ring.close()
        assert all(reread[u].open_text(tokens[u]) == f"secret of {u}" for u in users)
    finally:
        await pool.execute("DELETE FROM user_keys WHERE user_id = ANY($1::text[])", users)
        await pool.close()


async def test_moving_from_local_master_keys_to_kms_with_rewrap(env: TestEnv, kms: FakeKms) -> None:
    arn = kms.create_key(alias="alias/finstream")
    pool = await _pool(env)
    await _reset_keys(pool)
    local_id = f"m{uuid.uuid4().hex[:6]}"
    local_text = f"{local_id}:{base64.b64encode(os.urandom(32)).decode()}"
    users = [f"l-{uuid.uuid4().hex[:8]}" for _ in range(6)]
    try:
        ring = KeyRing(pool, LocalMasterKeys.parse(local_text))
        loaded = await ring.load(users, create=True)
        tokens = {u: loaded[u].seal_text(f"secret of {u}") for u in users}

        # Both set: KMS wraps, the local key still unwraps what it wrapped.
        both = master_keys(
            kms_settings(env, kms, "alias/finstream", privacy_master_keys=SecretStr(local_text))
        )
        assert isinstance(both, MovingToKms)
        ring = KeyRing(pool, both)
        try:
            reread = await ring.load(users)
            assert kms.calls["Decrypt"] == 0
            assert all(reread[u].open_text(tokens[u]) == f"secret of {u}" for u in users)
            assert await ring.rewrap() == len(users)
        finally:
            await ring.close()
        ids = await pool.fetch("SELECT DISTINCT master_key_id FROM user_keys")
        assert [r["master_key_id"] for r in ids] == [arn]

        # Then the local key goes: KMS alone opens every key.
        only = master_keys(kms_settings(env, kms, "alias/finstream"))
        assert isinstance(only, AwsKms)
        ring = KeyRing(pool, only)
        try:
            reread = await ring.load(users)
        finally:
            await ring.close()
        assert kms.calls["Decrypt"] == len(users)
        assert all(reread[u].open_text(tokens[u]) == f"secret of {u}" for u in users)
    finally:
        await pool.execute("DELETE FROM user_keys WHERE user_id = ANY($1::text[])", users)
        await pool.close()


async def test_aws_kms_settings_name_what_is_missing(env: TestEnv, kms: FakeKms) -> None:
    with pytest.raises(PrivacyConfigError, match="KEY_ID"):
        master_keys(kms_settings(env, kms, "", privacy_aws_kms_key_id=None))
    with pytest.raises(PrivacyConfigError, match="ACCESS_KEY_ID"):
        master_keys(kms_settings(env, kms, "alias/x", privacy_aws_access_key_id=None))
