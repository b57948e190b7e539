"""The identity provider's signing keys, fetched from its JWKS URL and cached (PRODUCT.md §1, §3).

Keys are refreshed every `cache_seconds` in the background, so a rotation needs no restart. A token
whose `kid` is unknown may trigger one extra fetch, but at most one per `min_refetch_seconds`: forged
`kid`s must not turn the gateway into a traffic amplifier against the IdP. When the IdP is down the
keys already held keep working; when none were ever fetched, tokens are refused (401), never a 500.
The document is bounded (512 KiB, 100 keys) and may be anything: too large, nested too deeply or
not JSON, a refresh fails, logs, keeps the old keys, and the next one comes at its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

log = logging.getLogger("cosmos_gateway.jwks")

FETCH_TIMEOUT = 5.0  # the whole fetch, so a slow trickle of bytes cannot hold a refresh open either
MAX_JWKS_BYTES = 512 * 1024
MAX_JWKS_KEYS = 100  # identity providers publish a handful; more would only cost parsing time


class JwksError(Exception):
    """The JWKS document could not be fetched or was not a key set."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One public key of the set; `algorithm` is the `alg` the JWK declares, if any."""

    key: Any
    algorithm: str | None
    kid: str | None


def parse_jwks(document: Any) -> tuple[dict[str, SigningKey], list[SigningKey]]:
    """Usable signature keys of a JWKS document: by `kid`, and those without one.

    Keys this library cannot use (unknown `kty`, encryption keys, symmetric keys) are skipped:
    one odd key must not take down the others.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWKS document (expected an object with a 'keys' list)")
    by_kid: dict[str, SigningKey] = {}
    anonymous: list[SigningKey] = []
    for entry in document["keys"]:
        if len(by_kid) + len(anonymous) >= MAX_JWKS_KEYS:
            log.warning("the JWKS holds more than %d usable keys; the rest are ignored", MAX_JWKS_KEYS)
            break
        if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct":
            continue  # a shared secret published in a JWKS is never a verification key
        try:
            parsed = jwt.PyJWK(dict(entry))
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as exc:
            log.warning("skipping a JWKS key that cannot be used: %s", exc)
            continue
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) and entry.get("kid") else None
        alg = entry.get("alg") if isinstance(entry.get("alg"), str) else None
        key = SigningKey(key=parsed.key, algorithm=alg, kid=kid)
        if kid is not None:
            by_kid[kid] = key
        else:
            anonymous.append(key)
    return by_kid, anonymous


class JwksCache:
    """Signing keys from one JWKS URL, refreshed in the background and on unknown `kid`s."""

    def __init__(self, url: str, *, cache_seconds: float, min_refetch_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._url = url
        self._cache_seconds = cache_seconds
        self._min_refetch = min_refetch_seconds
        self._clock = clock
        self._by_kid: dict[str, SigningKey] = {}
        self._anonymous: list[SigningKey] = []
        self._last_attempt = float("-inf")
        self._inflight: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0

    @property
    def has_keys(self) -> bool:
        return bool(self._by_kid or self._anonymous)

    def key(self, kid: str | None) -> SigningKey | None:
        return self._by_kid.get(kid) if kid is not None else None

    def keys(self) -> list[SigningKey]:
        return [*self._by_kid.values(), *self._anonymous]

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT))
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_periodically())

    async def close(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._session is not None:
            await self._session.close()

    async def refresh_for_unknown_kid(self) -> bool:
        """Fetch again because a token named a key we lack; False when the floor forbids it."""
        if self._inflight is None and self._clock() - self._last_attempt < self._min_refetch:
            return False
        return await self.refresh()

    async def refresh(self) -> bool:
        """One fetch, shared by every caller that asks while it runs. True when keys were replaced."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch())
            self._inflight.add_done_callback(self._clear_inflight)
        return await asyncio.shield(self._inflight)

    def _clear_inflight(self, _: asyncio.Task[bool]) -> None:
        self._inflight = None

    async def _fetch(self) -> bool:
        self._last_attempt = self._clock()
        self.fetches += 1
        try:
            document = await self._download()
            by_kid, anonymous = parse_jwks(document)
        except (TimeoutError, JwksError, aiohttp.ClientError, ValueError) as exc:
            # Keep serving with the keys we have: an IdP outage must not become a gateway outage.
            log.warning("JWKS fetch from %s failed (%s); keeping %d cached keys", self._url, exc,
                        len(self.keys()))
            return False
        except Exception:  # whatever the document did, the refresh goes on and the old keys stay
            log.exception("JWKS fetch from %s failed unexpectedly; keeping %d cached keys", self._url,
                          len(self.keys()))
            return False
        if not by_kid and not anonymous:
            log.warning("JWKS at %s holds no usable signature keys; keeping the cached ones", self._url)
            return False
        self._by_kid, self._anonymous = by_kid, anonymous
        return True

    async def _download(self) -> Any:
        assert self._session is not None, "JwksCache.start() was not called"
        async with self._session.get(self._url, headers={"Accept": "application/json"}) as response:
            if response.status != 200:
                raise JwksError(f"HTTP {response.status}")
            if response.content_length is not None and response.content_length > MAX_JWKS_BYTES:
                raise JwksError(f"document larger than {MAX_JWKS_BYTES // 1024} KiB")
            chunks: list[bytes] = []
            size = 0
            # read(n) returns what has arrived, not n bytes: read to the end, stopping past the limit.
            while chunk := await response.content.read(MAX_JWKS_BYTES + 1 - size):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_JWKS_BYTES:
                    raise JwksError(f"document larger than {MAX_JWKS_BYTES // 1024} KiB")
        try:
            return json.loads(b"".join(chunks))
        except RecursionError:  # nested deeper than the parser goes: not a key set either
            raise JwksError("document nested too deeply") from None

    async def _refresh_periodically(self) -> None:
        while True:
            # Retry sooner while we hold no keys at all, so a gateway started during an IdP outage recovers.
            await asyncio.sleep(self._cache_seconds if self.has_keys else min(self._min_refetch, 5.0))
            try:
                await self.refresh()
            except Exception:  # _fetch reports its own failures; this loop must never end early
                log.exception("JWKS refresh from %s failed", self._url)

