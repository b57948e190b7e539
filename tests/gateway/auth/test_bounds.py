"""What client input can make the authenticator hold or fetch: bounded (PRODUCT.md §3 "Hostile input").

The verified-token cache is bounded in entries and bytes and evicts the oldest entries one by one; a
JWKS document that is too deep or too large is refused while the keys already held keep working, and
forged `kid`s cannot make the gateway fetch the JWKS more than once per floor.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
from aiohttp import web

from gateway.auth.jwks import MAX_JWKS_BYTES, JwksCache
from gateway.auth.tokens import Authenticator, AuthError
from tests.gateway.jwt_helpers import KeyPair, rsa_pair
from tests.support import auth_settings, jwks_authenticator, token


def cached(auth: Authenticator) -> dict[str, Any]:
    return auth._cache  # the cache itself: what it holds is the point of these tests


# ------------------------------------------------------------------ the verified-token cache


async def test_token_cache_is_bounded_in_bytes() -> None:
    auth = Authenticator(auth_settings())
    # 2,000 tokens of about 3 KiB each: 6 MB of tokens, more than the cache may hold.
    tokens = [token("acme", jti=f"{i}", pad="p" * 2200) for i in range(2000)]
    assert all(2800 < len(t) < 4096 for t in tokens)
    for raw in tokens:
        await auth.authenticate("Bearer " + raw)
    held = sum(len(t) for t in cached(auth))
    assert held <= 4 * 1024 * 1024
    assert tokens[-1] in cached(auth)  # the newest are kept, the oldest went first
    assert tokens[0] not in cached(auth)


async def test_token_too_large_for_the_cache_is_verified_each_time() -> None:
    auth = Authenticator(auth_settings())
    raw = token("acme", pad="p" * 5000)
    assert 4096 < len(raw) <= 8192
    first = await auth.authenticate("Bearer " + raw)
    assert raw not in cached(auth)
    assert (await auth.authenticate("Bearer " + raw)).tenant == first.tenant == "acme"


async def test_token_cache_evicts_gradually_never_all_at_once() -> None:
    auth = Authenticator(auth_settings())
    sizes = []
    for i in range(10_500):
        await auth.authenticate("Bearer " + token("acme", jti=f"{i}"))
        sizes.append(len(cached(auth)))
    assert max(sizes) <= 10_000
    # Once full, each new token pushes out about one old one: no cliff of a thousand evictions.
    drops = [before - after for before, after in itertools.pairwise(sizes) if after < before]
    assert not drops or max(drops) <= 2, max(drops)
    assert sizes[-1] >= min(max(sizes) - 2, 1000)


async def test_same_token_verified_twice_at_once_is_cached_once() -> None:
    auth = Authenticator(auth_settings())
    raw = "Bearer " + token("acme")
    await asyncio.gather(*(auth.authenticate(raw) for _ in range(5)))
    assert len(cached(auth)) == 1


# ------------------------------------------------------------------ JWKS documents


class JwksDocument:
    """A JWKS endpoint serving whatever bytes the test sets (with or without Content-Length)."""

    def __init__(self, body: bytes, *, chunked: bool = False) -> None:
        self.body = body
        self.chunked = chunked
        self.fetches = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        if not self.chunked:
            return web.Response(body=self.body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(self.body), 65536):
            await response.write(self.body[start:start + 65536])
        await response.write_eof()
        return response

    async def start(self) -> JwksDocument:
        app = web.Application()
        app.router.add_get("/jwks.json", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/jwks.json"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture(scope="module")
def key() -> KeyPair:
    return rsa_pair("k1")


@pytest.fixture
async def document(key: KeyPair) -> AsyncIterator[JwksDocument]:
    server = await JwksDocument(json.dumps({"keys": [key.jwk()]}).encode()).start()
    yield server
    await server.close()


HOSTILE = {
    "nested-100k": b"[" * 100_000 + b"]" * 100_000,
    "nested-in-keys": b'{"keys": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
    "huge": b'{"keys": [], "pad": "' + b"x" * (8 * MAX_JWKS_BYTES) + b'"}',
}


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_jwks_document_keeps_the_old_keys(document: JwksDocument, key: KeyPair, name: str,
                                                        chunked: bool) -> None:
    jwks = JwksCache(document.url, cache_seconds=300, min_refetch_seconds=0)
    await jwks.start()
    try:
        assert jwks.key("k1") is not None
        document.body, document.chunked = HOSTILE[name], chunked
        assert await asyncio.wait_for(jwks.refresh(), 10) is False
        assert jwks.key("k1") is not None  # still verifying with the keys it had
    finally:
        await jwks.close()


async def test_hostile_jwks_document_at_start_is_survived(key: KeyPair) -> None:
    server = await JwksDocument(HOSTILE["nested-100k"]).start()
    auth = Authenticator(auth_settings(algorithms=("RS256",), hs256_secret=None, jwks_url=server.url,
                                       jwks_min_refetch_seconds=0))
    try:
        await asyncio.wait_for(auth.start(), 10)  # starts, with no keys yet
        with pytest.raises(AuthError) as caught:
            await auth.authenticate("Bearer " + key.sign())
        assert caught.value.status == 401
        server.body = json.dumps({"keys": [key.jwk()]}).encode()
        assert (await auth.authenticate("Bearer " + key.sign())).tenant == "acme"
    finally:
        await auth.close()
        await server.close()


async def test_periodic_refresh_survives_a_hostile_document(document: JwksDocument, key: KeyPair) -> None:
    jwks = JwksCache(document.url, cache_seconds=0.05, min_refetch_seconds=0)
    await jwks.start()
    try:
        document.body = HOSTILE["nested-100k"]
        fetches = document.fetches
        deadline = time.monotonic() + 10
        while document.fetches < fetches + 3:  # several hostile refreshes in a row
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        rotated = rsa_pair("k2")
        document.body = json.dumps({"keys": [rotated.jwk()]}).encode()
        while jwks.key("k2") is None:  # the refresher is still running and picks up the rotation
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        await jwks.close()


async def test_large_but_legitimate_jwks_document_is_read_whole(key: KeyPair) -> None:
    # Well under the limit, but more than one read of the response stream.
    body = json.dumps({"keys": [key.jwk(x5c=["A" * 1000] * 300)]}).encode()
    assert 200_000 < len(body) < MAX_JWKS_BYTES
    for chunked in (False, True):
        server = await JwksDocument(body, chunked=chunked).start()
        jwks = JwksCache(server.url, cache_seconds=300, min_refetch_seconds=0)
        try:
            await jwks.start()
            assert jwks.key("k1") is not None
        finally:
            await jwks.close()
            await server.close()


async def test_many_keys_are_bounded(key: KeyPair) -> None:
    many = [key.jwk(kid=f"k{i}") for i in range(500)]
    server = await JwksDocument(json.dumps({"keys": many}).encode()).start()
    jwks = JwksCache(server.url, cache_seconds=300, min_refetch_seconds=0)
    try:
        await jwks.start()
        assert 0 < len(jwks.keys()) <= 100
    finally:
        await jwks.close()
        await server.close()


async def test_forged_kids_at_once_cause_at_most_one_fetch(document: JwksDocument, key: KeyPair) -> None:
    async with jwks_authenticator(document.url, jwks_min_refetch_seconds=30) as auth:
        before = document.fetches
        forged = [key.sign(kid=f"forged-{i}") for i in range(200)]
        results = await asyncio.gather(*(auth.authenticate("Bearer " + t) for t in forged), return_exceptions=True)
        assert all(isinstance(r, AuthError) and r.reason == "unknown_key" for r in results)
        assert document.fetches - before <= 1
        for t in forged[:50]:  # and later ones within the floor fetch nothing
            with pytest.raises(AuthError):
                await auth.authenticate("Bearer " + t)
        assert document.fetches - before <= 1


# ------------------------------------------------------------------ any Authorization value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_AUTHORIZATION = st.one_of(
    st.binary(max_size=300).map(lambda raw: raw.decode("utf-8", "surrogateescape")),  # as aiohttp decodes
    st.text(max_size=300).map(lambda text: "Bearer " + text),
    # Three segments of arbitrary bytes: reaches the JWT header parser with any JSON, or none.
    st.builds(lambda head, body, sig: f"Bearer {_b64(head)}.{_b64(body)}.{_b64(sig)}",
              st.one_of(st.binary(max_size=120), st.builds(lambda v: json.dumps({"alg": v}).encode(),
                                                            st.one_of(st.text(max_size=8), st.integers()))),
              st.binary(max_size=120), st.binary(max_size=40)),
)


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(value=_AUTHORIZATION)
def test_any_authorization_value_is_an_identity_or_an_auth_error(value: str) -> None:
    auth = Authenticator(auth_settings(algorithms=("HS256", "RS256")))
    try:
        asyncio.run(auth.authenticate(value))
    except AuthError as error:
        assert error.status in (401, 403)
