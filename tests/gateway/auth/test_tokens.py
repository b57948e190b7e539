"""The authenticator against real tokens, a real PEM file and a real JWKS HTTP server."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.auth.mint import mint_token
from gateway.auth.tokens import Authenticator, AuthError, Identity
from tests.gateway.jwt_helpers import JwksServer, KeyPair, claims_for, ec_pair, rsa_pair
from tests.support import AUDIENCE, ISSUER, SECRET, auth_settings, jwks_authenticator, token


async def authenticate(auth: Authenticator, value: str | None) -> Identity:
    return await auth.authenticate(value)


async def refused(auth: Authenticator, value: str | None) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await auth.authenticate(value)
    return caught.value


@pytest.fixture(scope="module")
def rsa_key() -> KeyPair:
    return rsa_pair()


@pytest.fixture(scope="module")
def ec_key() -> KeyPair:
    return ec_pair()


@pytest.fixture
async def jwks(rsa_key: KeyPair, ec_key: KeyPair) -> AsyncIterator[JwksServer]:
    server = JwksServer(keys=[rsa_key.jwk(), ec_key.jwk()])
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def jwks_auth(jwks: JwksServer) -> AsyncIterator[Authenticator]:
    auth = Authenticator(auth_settings(algorithms=("RS256", "ES256", "HS256"), jwks_url=jwks.url))
    await auth.start()
    yield auth
    await auth.close()


# ------------------------------------------------------------------ HS256 and claims


async def test_hs256_identity() -> None:
    auth = Authenticator(auth_settings(plan_claim="plan"))
    identity = await authenticate(auth, "Bearer " + token("acme", plan="professional", scope="a b"))
    assert (identity.tenant, identity.subject, identity.plan) == ("acme", "user-1", "professional")
    assert identity.scopes == {"a", "b"}


async def test_plan_claim_ignored_unless_configured() -> None:
    identity = await authenticate(Authenticator(auth_settings()), "Bearer " + token("acme", plan="sovereign"))
    assert identity.plan is None


@pytest.mark.parametrize("value, reason, presented", [
    (None, "missing", False),
    ("", "missing", False),
    ("Basic dXNlcjpwYXNz", "malformed", True),
    ("Bearer", "malformed", True),
    ("Bearer not.a.jwt", "malformed", True),
    ("Bearer a b", "malformed", True),
    ("Bearer " + "a" * 9000, "malformed", True),
])
async def test_malformed_headers(value: str | None, reason: str, presented: bool) -> None:
    error = await refused(Authenticator(auth_settings()), value)
    assert (error.reason, error.token_presented, error.status) == (reason, presented, 401)


async def test_scheme_is_case_insensitive() -> None:
    assert (await authenticate(Authenticator(auth_settings()), "bearer " + token())).tenant == "acme"


@pytest.mark.parametrize("claims, reason", [
    ({"exp": int(time.time()) - 120}, "expired"),
    ({"nbf": int(time.time()) + 600}, "not_yet_valid"),
    ({"iss": "https://evil.test/"}, "bad_issuer"),
    ({"aud": "someone-else"}, "bad_audience"),
    ({"exp": None}, "invalid_claim"),
    ({"exp": "9999999999"}, "invalid_claim"),
    ({"iat": 1e400}, "invalid_claim"),  # json.dumps writes Infinity: not a NumericDate
    ({"org_id": "bad tenant!"}, "invalid_claim"),
    ({"org_id": "x" * 65}, "invalid_claim"),
    ({"org_id": 42}, "invalid_claim"),
    ({"sub": "evil\r\nX-Cosmos-Tenant: other"}, "invalid_claim"),
])
async def test_bad_claims_refused(claims: dict[str, Any], reason: str) -> None:
    raw = _raw_token(claims_for(claims))
    error = await refused(Authenticator(auth_settings()), "Bearer " + raw)
    assert error.reason == reason


def _raw_token(claims: dict[str, Any], secret: str = SECRET) -> str:
    """A token whose payload JSON is written as given (json.dumps writes 1e400 as Infinity)."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = header + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


async def test_leeway_accepts_just_expired() -> None:
    raw = token("acme", exp=int(time.time()) - 10)
    assert (await authenticate(Authenticator(auth_settings()), "Bearer " + raw)).tenant == "acme"


async def test_missing_tenant_is_403() -> None:
    error = await refused(Authenticator(auth_settings()), "Bearer " + token(None))
    assert (error.reason, error.status) == ("missing_tenant", 403)


async def test_wrong_secret_is_bad_signature() -> None:
    wrong = token(secret="another-secret-0123456789abcdef-0123456789")
    error = await refused(Authenticator(auth_settings()), "Bearer " + wrong)
    assert error.reason == "bad_signature"


async def test_alg_none_never_accepted() -> None:
    raw = jwt.encode(claims_for(), None, algorithm="none")  # type: ignore[arg-type]
    error = await refused(Authenticator(auth_settings(algorithms=("HS256", "none"))), "Bearer " + raw)
    assert error.reason == "disallowed_alg"


async def test_alg_outside_allow_list_refused() -> None:
    raw = jwt.encode(claims_for(), SECRET * 2, algorithm="HS512")
    assert (await refused(Authenticator(auth_settings()), "Bearer " + raw)).reason == "disallowed_alg"


async def test_unknown_crit_extension_refused() -> None:
    raw = jwt.encode(claims_for(), SECRET, algorithm="HS256", headers={"crit": ["exotic"], "exotic": 1})
    assert (await refused(Authenticator(auth_settings()), "Bearer " + raw)).reason == "malformed"


async def test_verified_token_is_cached_until_expiry() -> None:
    now = [time.time()]
    auth = Authenticator(auth_settings(leeway_seconds=0), clock=lambda: now[0])
    raw = "Bearer " + token("acme", ttl=60)
    first = await authenticate(auth, raw)
    assert await authenticate(auth, raw) is first
    now[0] += 61
    # Past its expiry (on the injected clock) the cached verification is dropped and the token
    # verified afresh, on the same clock: expired.
    assert (await refused(auth, raw)).reason == "expired"
    now[0] -= 30
    assert await authenticate(auth, raw) is not first  # verified again, cached anew


# ------------------------------------------------------------------ public paths


@pytest.mark.parametrize("path, public", [
    ("/health", True),
    ("/status", True),
    ("/status/chains/1", True),
    ("/api/chains", False),
    ("/healthz", False),
    ("/status/../api/chains", False),
    ("/status/%2e%2e/api/chains", False),
    ("/status/%2E%2e/api", False),
    ("/status/.%2e/api", False),
    ("/status/%252e%252e/api", False),
    ("/status%2f..%2fapi", False),
    ("/status/..\\api", False),
    ("/status/./x", True),  # every reading stays under /status/
    ("/status/..;/api/chains", False),
    ("/status;/../api/chains", False),
    ("/status/..%3b/api/chains", False),
    ("/api/../status/x", False),  # resolved it is public, as routed unresolved it is not
    ("/Status/x", False),
    ("/health/", True),
    ("/health;x", False),
])
def test_public_paths(path: str, public: bool) -> None:
    auth = Authenticator(auth_settings(public_paths=("/health", "/status/**")))
    assert auth.is_public(path) is public


# ------------------------------------------------------------------ public keys


async def test_pem_public_key(tmp_path: Path, rsa_key: KeyPair) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(rsa_key.public_pem)
    auth = Authenticator(auth_settings(algorithms=("RS256",), hs256_secret=None, public_key_file=str(pem)))
    assert (await authenticate(auth, "Bearer " + rsa_key.sign(kid=None))).tenant == "acme"
    other = rsa_pair("other")
    assert (await refused(auth, "Bearer " + other.sign(kid=None))).reason == "bad_signature"


async def test_hmac_token_never_checked_with_public_key(tmp_path: Path, rsa_key: KeyPair) -> None:
    """The classic alg confusion: HS256 signed with the RSA public key's PEM as the secret."""
    pem = tmp_path / "key.pem"
    pem.write_bytes(rsa_key.public_pem)
    auth = Authenticator(auth_settings(algorithms=("RS256", "HS256"), hs256_secret=None, public_key_file=str(pem)))
    forged = _raw_token(claims_for(), secret=rsa_key.public_pem.decode())
    assert (await refused(auth, "Bearer " + forged)).reason == "disallowed_alg"


async def test_rs_token_with_ec_key_refused(tmp_path: Path, ec_key: KeyPair) -> None:
    pem = tmp_path / "ec.pem"
    pem.write_bytes(ec_key.public_pem)
    auth = Authenticator(auth_settings(algorithms=("RS256", "ES256"), hs256_secret=None, public_key_file=str(pem)))
    assert (await authenticate(auth, "Bearer " + ec_key.sign(kid=None))).tenant == "acme"
    rsa_signed = rsa_pair().sign(kid=None)
    assert (await refused(auth, "Bearer " + rsa_signed)).reason == "unknown_key"


async def test_jwks_rs256_and_es256(jwks_auth: Authenticator, rsa_key: KeyPair, ec_key: KeyPair) -> None:
    assert (await authenticate(jwks_auth, "Bearer " + rsa_key.sign())).tenant == "acme"
    assert (await authenticate(jwks_auth, "Bearer " + ec_key.sign(sub="svc"))).subject == "svc"


async def test_kid_of_other_family_refused(jwks_auth: Authenticator, rsa_key: KeyPair, ec_key: KeyPair) -> None:
    """An ES256 token naming the RSA key's kid is refused, whatever it is signed with."""
    raw = ec_key.sign(kid=rsa_key.kid)
    assert (await refused(jwks_auth, "Bearer " + raw)).reason == "disallowed_alg"


async def test_keys_named_in_token_never_fetched(jwks_auth: Authenticator, jwks: JwksServer) -> None:
    attacker = rsa_pair("attacker")
    raw = attacker.sign(headers={"jku": jwks.url.replace("jwks.json", "evil"), "jwk": attacker.jwk(),
                                 "x5u": "http://127.0.0.1:1/x"})
    assert (await refused(jwks_auth, "Bearer " + raw)).reason in ("unknown_key", "bad_signature")


async def test_unknown_kid_refetches_at_most_once_per_floor(jwks_auth: Authenticator, jwks: JwksServer) -> None:
    stranger = rsa_pair("stranger")
    before = jwks.fetches
    for _ in range(5):
        assert (await refused(jwks_auth, "Bearer " + stranger.sign())).reason == "unknown_key"
    assert jwks.fetches == before  # the start-up fetch was within the 30 s floor


async def test_rotation_without_restart(jwks: JwksServer, rsa_key: KeyPair) -> None:
    async with jwks_authenticator(jwks.url, jwks_min_refetch_seconds=0) as auth:
        rotated = rsa_pair("rsa-2")
        jwks.keys = [rotated.jwk()]
        assert (await authenticate(auth, "Bearer " + rotated.sign())).tenant == "acme"
        # A token of the retired key was never verified before: it no longer is.
        assert (await refused(auth, "Bearer " + rsa_key.sign(sub="late"))).reason == "unknown_key"


async def test_jwks_down_keeps_cached_keys(jwks: JwksServer, rsa_key: KeyPair) -> None:
    async with jwks_authenticator(jwks.url, jwks_min_refetch_seconds=0) as auth:
        jwks.up = False
        assert (await authenticate(auth, "Bearer " + rsa_key.sign())).tenant == "acme"
        assert (await refused(auth, "Bearer " + rsa_pair("new").sign())).reason == "unknown_key"


async def test_no_keys_at_all_is_401(rsa_key: KeyPair) -> None:
    server = JwksServer(up=False)
    await server.start()
    auth = Authenticator(auth_settings(algorithms=("RS256",), hs256_secret=None, jwks_url=server.url))
    try:
        await auth.start()  # the IdP being down at start-up does not stop the gateway
        error = await refused(auth, "Bearer " + rsa_key.sign())
        assert (error.reason, error.status) == ("no_keys", 401)
    finally:
        await auth.close()
        await server.close()


async def test_jwks_garbage_tolerated(rsa_key: KeyPair) -> None:
    server = JwksServer(keys=[{"kty": "nonsense"}, {"kty": "oct", "k": "c2VjcmV0"}, rsa_key.jwk()])
    await server.start()
    auth = Authenticator(auth_settings(algorithms=("RS256", "HS256"), jwks_url=server.url))
    try:
        await auth.start()
        assert (await authenticate(auth, "Bearer " + rsa_key.sign())).tenant == "acme"
    finally:
        await auth.close()
        await server.close()


# ------------------------------------------------------------------ minting


async def test_mint_token_round_trip() -> None:
    raw = mint_token(SECRET, tenant="acme", plan="enterprise", ttl=60, scope="gateway:admin", issuer=ISSUER,
                     audience=AUDIENCE)
    identity = await authenticate(Authenticator(auth_settings(plan_claim="plan")), "Bearer " + raw)
    assert (identity.tenant, identity.plan, identity.scopes) == ("acme", "enterprise", {"gateway:admin"})


def test_mint_token_refuses_bad_tenant() -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, tenant="no spaces")
