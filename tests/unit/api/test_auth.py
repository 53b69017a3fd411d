"""Token verification: signature, issuer, audience, expiry, not-before, algorithms, key sets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from finstream.api import auth
from finstream.api.auth import AuthError, KeySet, KeysUnavailable, TokenVerifier, bearer_token
from tests.support.api import AUDIENCE, HS_SECRET, ISSUER, Keys
from tests.support.services import free_port


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys.create(tmp_path_factory.mktemp("jwks"))


def verifier(keys: Keys | None, *, hs256: bool = False, leeway: float = 5.0) -> TokenVerifier:
    return TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        leeway=leeway,
        keyset=KeySet(str(keys.jwks_path)) if keys else None,
        hs256_secret=HS_SECRET.encode() if hs256 else None,
    )


async def reason(v: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        await v.verify(token)
    return info.value.reason


async def test_valid_tokens_of_each_key_type(keys: Keys) -> None:
    v = verifier(keys)
    for alg in ("ES256", "RS256", "PS256"):
        p = await v.verify(keys.token("alice", ["user"], alg=alg))
        assert p.subject == "alice"
        assert p.roles == {"user"}
        assert p.expires_at > time.time()


async def test_roles_claim_forms(keys: Keys) -> None:
    v = verifier(keys)
    assert (await v.verify(keys.token(roles=None))).roles == {"user"}
    string_roles = keys.token(roles=None, claims={"roles": "operator user bogus"})
    assert (await v.verify(string_roles)).roles == {"operator", "user"}
    assert await reason(v, keys.token(roles=["admin"])) == "bad_claims"
    assert await reason(v, keys.token(roles=None, claims={"roles": 7})) == "bad_claims"


async def test_refusals_name_the_reason(keys: Keys) -> None:
    v = verifier(keys)
    assert await reason(v, keys.token(ttl=-60)) == "expired"
    assert await reason(v, keys.token(aud="someone-else")) == "bad_audience"
    assert await reason(v, keys.token(iss="https://evil.example")) == "bad_issuer"
    assert await reason(v, keys.forged()) == "bad_signature"
    assert await reason(v, keys.token(nbf=time.time() + 120)) == "not_yet_valid"
    assert await reason(v, keys.token(kid="nobody")) == "unknown_key"
    assert await reason(v, "not-a-jwt") == "malformed"
    assert await reason(v, "a.b.c") == "malformed"
    assert await reason(v, "x" * 9000) == "malformed"
    assert await reason(v, keys.token(sub="me")) == "bad_claims"
    assert await reason(v, keys.token(sub="a{b}c")) == "bad_claims"


async def test_small_clock_skew_is_tolerated(keys: Keys) -> None:
    v = verifier(keys, leeway=30)
    assert (await v.verify(keys.token(ttl=-10))).subject == "alice"
    assert (await v.verify(keys.token(nbf=time.time() + 10))).subject == "alice"
    assert await reason(v, keys.token(ttl=-60)) == "expired"


async def test_required_claims(keys: Keys) -> None:
    v = verifier(keys)
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice"}  # no exp
    token = jwt.encode(payload, keys.ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert await reason(v, token) == "bad_claims"


async def test_alg_none_and_hs256_are_refused_without_a_secret(keys: Keys) -> None:
    v = verifier(keys)
    unsigned = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": int(time.time()) + 60},
        None,
        algorithm="none",
    )
    assert await reason(v, unsigned) == "alg_not_allowed"
    hs = keys.token(alg="HS256", key=HS_SECRET, kid=None)
    assert await reason(v, hs) == "alg_not_allowed"


async def test_hs256_only_when_enabled(keys: Keys) -> None:
    v = verifier(keys, hs256=True)
    assert (await v.verify(keys.token(alg="HS256", key=HS_SECRET, kid=None))).subject == "alice"
    wrong = keys.token(alg="HS256", key=HS_SECRET + "x", kid=None)
    assert await reason(v, wrong) == "bad_signature"
    with pytest.raises(ValueError, match="32 bytes"):
        TokenVerifier(issuer="i", audience="a", leeway=0, hs256_secret=b"short")


async def test_algorithm_confusion_is_refused(keys: Keys) -> None:
    # An HS256 token "signed" with the RSA public key as the HMAC secret: the
    # classic confusion attack. With HS256 disabled it is refused outright; with
    # it enabled the secret is ours, so the signature does not match.
    public_pem = keys.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": int(time.time()) + 60}
    import hmac
    from hashlib import sha256

    header = jwt.utils.base64url_encode(
        json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode()
    )
    body = jwt.utils.base64url_encode(json.dumps(payload).encode())
    signing_input = header + b"." + body
    sig = jwt.utils.base64url_encode(hmac.new(public_pem, signing_input, sha256).digest())
    token = (signing_input + b"." + sig).decode()
    assert await reason(verifier(keys), token) == "alg_not_allowed"
    assert await reason(verifier(keys, hs256=True), token) == "bad_signature"
    # An EC key cannot sign RS256 tokens, and a key with "alg" pinned takes only that.
    es_as_rs = keys.token(alg="RS256", kid="ec-1")
    assert await reason(verifier(keys), es_as_rs) == "alg_not_allowed"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_symmetric_keys_in_a_jwks_are_ignored(keys: Keys) -> None:
    v = verifier(keys)
    # Signed with the set's own oct key ("secret"): must not verify.
    forged = keys.token(alg="HS256", key="secret", kid="oct-1")
    assert await reason(v, forged) == "alg_not_allowed"
    v_hs = verifier(keys, hs256=True)
    assert await reason(v_hs, forged) == "bad_signature"


async def test_key_rotation_reloads_the_file(
    keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "_MIN_REFRESH", 0.0)
    path = tmp_path / "jwks.json"
    path.write_text(keys.jwks_path.read_text())
    v = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=0, keyset=KeySet(str(path)))
    await v.start()
    new_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(new_key.public_key()))
    jwk.update(kid="ec-2", alg="ES256")
    data = json.loads(path.read_text())
    data["keys"].append(jwk)
    path.write_text(json.dumps(data))
    token = keys.token(key=new_key, kid="ec-2")
    assert (await v.verify(token)).subject == "alice"


async def test_jwks_from_a_url(keys: Keys) -> None:
    hits = 0

    async def serve(_: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.json_response(json.loads(keys.jwks_path.read_text()))

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
        v = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=0, keyset=KeySet(url))
        await v.start()
        for _ in range(3):
            assert (await v.verify(keys.token())).subject == "alice"
        assert hits == 1, "the key set is cached, not fetched per request"
    finally:
        await runner.cleanup()


async def test_unreachable_key_set_is_unavailable_not_unauthorized(keys: Keys) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"
    v = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=0, keyset=KeySet(url))
    await v.start()
    assert not v.ready
    with pytest.raises(KeysUnavailable):
        await v.verify(keys.token())


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_verifier_needs_a_key_source(tmp_path: Path) -> None:
    from finstream.settings import Settings

    with pytest.raises(ValueError, match="no token verification configured"):
        TokenVerifier.from_settings(Settings(env="prod", stack_dir=tmp_path))
    dev = TokenVerifier.from_settings(Settings(env="dev", stack_dir=tmp_path))
    assert dev.keyset is not None
    assert Path(dev.keyset.source).exists()


async def test_development_tokens_verify(tmp_path: Path) -> None:
    from finstream.api.devkeys import mint_token
    from finstream.settings import Settings

    settings = Settings(env="dev", stack_dir=tmp_path)
    v = TokenVerifier.from_settings(settings)
    await v.start()
    token = mint_token(settings, "demo-user", ["user", "operator"])
    p = await v.verify(token)
    assert (p.subject, p.roles) == ("demo-user", {"user", "operator"})
    # The key is made once and reused.
    assert mint_token(settings, "x").count(".") == 2
    assert len(list((tmp_path / "api").glob("*.pem"))) == 1


async def test_verified_tokens_are_cached_until_they_expire(keys: Keys) -> None:
    # The cache's clock is the test's: under load a real one-second token could
    # expire before its first check.
    now = [time.time()]
    v = TokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        leeway=2,
        keyset=KeySet(str(keys.jwks_path)),
        clock=lambda: now[0],
    )
    token = keys.token(ttl=30)
    first = await v.verify(token)
    now[0] += 10
    assert await v.verify(token) is first, "the second check is served from the cache"
    now[0] = first.expires_at + 2.5
    assert await reason(v, token) == "expired", "expiry is checked on the cached entry"
    now[0] = first.expires_at - 20
    assert await v.verify(token) is not first, "the expired entry left the cache"
