"""Who is calling: JWT verification for the proxy and admin listeners (PRODUCT.md §1-§4).

A token is checked with the key source of its algorithm family only: HS* with the configured
secret, RS*/PS*/ES*/EdDSA with the JWKS keys or the PEM public key file. So an HMAC token can never
be "verified" with a public key used as a secret. Keys named inside a token (`jku`, `x5u`, `jwk`,
`x5c`) are never fetched or trusted. A verified token is cached until it expires, so the hot path
parses each token once; the cache is bounded in entries and bytes and drops its oldest entries first.

Everything a token carries is hostile input until checked here, independently of the PyJWT release:
the credentials must be visible ASCII, a `crit` header is refused (no extension is understood), the
NumericDates `exp`/`nbf`/`iat` must be numbers between 1970 and 9999 (checked here on the injected
clock), and the subject is passed on percent-encoded, so nothing from a token can break a header.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.auth.jwks import JwksCache
from gateway.config.settings import AuthSettings
from metering.keys import TENANT_ID
from metering.meters import compile_glob
from metering.paths import UnsafePath, readings

_PLAN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SUBJECT_MAX = 255
# What `sub` keeps as it is in X-Cosmos-Subject: visible ASCII but `%`; every other UTF-8 byte is %XX.
_SUBJECT_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
_TOKEN_CACHE_MAX = 10_000
# The cache's memory, estimated from the sizes of what each entry holds (token, claims, identity).
_TOKEN_CACHE_BYTES = 4 * 1024 * 1024
# Longer tokens are verified on every request instead: real ones are far shorter.
_TOKEN_CACHE_MAX_TOKEN = 4096
_TOKEN_CACHE_ENTRY_OVERHEAD = 512  # the Identity, its scopes and the cache's own tuple and slot
# A cached verification is trusted for at most this long, so a key dropped from the JWKS stops working.
_TOKEN_CACHE_SECONDS = 300.0
_MAX_TOKEN_LENGTH = 8192
# RFC 9110 §5.6.3 optional whitespace: only SP and HTAB. str.strip() would also drop NEL, NBSP and other
# Unicode spaces, so that a credential followed by one of them would still match.
_OWS = " \t"
_CREDENTIALS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: token68 and every configured admin token
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_NUMERIC_DATES = ("exp", "nbf", "iat")
_NUMERIC_DATE_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z: beyond it no date type can hold the value
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1", "ES256K": "secp256k1"}


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller.

    `subject` is the token's `sub` as the gateway passes it on (X-Cosmos-Subject, audit actors):
    percent-encoded UTF-8 (RFC 3986 §2.1) for every character outside visible ASCII and for `%`
    itself, so a subject of visible ASCII without `%` is unchanged, and any subject decodes back
    with `urllib.parse.unquote`. The raw claim stays in `claims`.
    """

    tenant: str
    subject: str | None
    plan: str | None
    scopes: frozenset[str]
    expires_at: float
    claims: Mapping[str, Any] = field(repr=False)


class AuthError(Exception):
    """Authentication failed; `reason` is a bounded metric label, `detail` is safe to show the client."""

    def __init__(self, reason: str, detail: str, *, token_presented: bool = True, status: int = 401) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.token_presented = token_presented
        self.status = status


def family(algorithm: str) -> str:
    """`hmac`, `rsa`, `ec` or `okp`: which kind of key may verify a token of this algorithm."""
    if algorithm.startswith("HS"):
        return "hmac"
    if algorithm.startswith(("RS", "PS")):
        return "rsa"
    if algorithm.startswith("ES"):
        return "ec"
    if algorithm == "EdDSA":
        return "okp"
    return "unknown"


def _key_family(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "okp"
    return "unknown"


def _fits(key: Any, algorithm: str) -> bool:
    """May this public key verify a token of this algorithm (family, and curve for ES*)?"""
    if _key_family(key) != family(algorithm):
        return False
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _CURVES.get(algorithm) == key.curve.name
    return True


def load_public_key(path: str) -> Any:
    """The PEM public key file's key; a ValueError names the problem."""
    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a PEM public key ({exc})") from None
    if _key_family(key) == "unknown":
        raise ValueError(f"{path}: unsupported key type {type(key).__name__}")
    return key


class Authenticator:
    """Verifies bearer tokens against the configured issuer, audience, algorithms and keys."""

    def __init__(self, settings: AuthSettings, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._algorithms = frozenset(a for a in settings.algorithms if a.lower() != "none")
        self._secret = settings.hs256_secret.encode() if settings.hs256_secret else None
        self._pem_key = load_public_key(settings.public_key_file) if settings.public_key_file else None
        self._jwks = JwksCache(settings.jwks_url, cache_seconds=settings.jwks_cache_seconds,
                               min_refetch_seconds=settings.jwks_min_refetch_seconds,
                               clock=time.monotonic) if settings.jwks_url else None
        # The public globs as one alternation of anchored patterns: one match per reading. Case-sensitive.
        public = [f"(?:{compile_glob(p).pattern})" for p in settings.public_paths]
        self._public = re.compile("|".join(public)) if public else None
        # token -> (identity, trusted until, estimated bytes); insertion order is age order.
        self._cache: dict[str, tuple[Identity, float, int]] = {}
        self._cache_bytes = 0
        # The time claims are checked here (`_check_times`): on the injected clock, and the same with
        # every PyJWT release (older ones let OverflowError or TypeError escape for odd values).
        self._options = {"require": ["exp"], "verify_aud": settings.audience is not None,
                         "verify_exp": False, "verify_nbf": False, "verify_iat": False}

    async def start(self) -> None:
        if self._jwks is not None:
            await self._jwks.start()

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()

    def is_public(self, path: str | tuple[str, ...]) -> bool:
        """Whether a path is under `public_paths`: the raw path (no query), or its readings
        (`metering.paths.readings`) when the caller has them already.

        Public only when every reading is, with the exact case (the upstream routes case-sensitively), so
        no spelling (dot-segments, `..;`, an encoded slash or `;`) carries a path out of the allow-list;
        a path that cannot be read safely is never public.
        """
        public = self._public
        if public is None:
            return False
        if isinstance(path, str):
            try:
                path = readings(path)
            except UnsafePath:
                return False
        for reading in path:
            if public.fullmatch(reading) is None:
                return False
        return True

    async def authenticate(self, authorization: str | None, *, require_tenant: bool = True) -> Identity:
        """The identity behind an `Authorization` header value, or AuthError.

        `require_tenant=False` (the admin API) accepts a token without the tenant claim; its
        identity then has `tenant == ""`.
        """
        # Only cached tokens, which passed _verify's check of the JWS form (base64url ASCII), can hit:
        # the characters of the others are checked there, after one dict lookup.
        token = _credentials(authorization)
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            identity, valid_until, _ = cached
            if now < valid_until:
                if require_tenant and not identity.tenant:
                    raise self._missing_tenant()
                return identity
            self._forget(token)
        identity = await self._verify(token, now, require_tenant)
        self._remember(token, identity, now)
        return identity

    def _missing_tenant(self) -> AuthError:
        claim = self._settings.tenant_claim
        return AuthError("missing_tenant", f"the token has no {claim!r} claim", status=403)

    def _remember(self, token: str, identity: Identity, now: float) -> None:
        """Cache a verification, evicting the oldest entries one by one until it fits."""
        if len(token) > _TOKEN_CACHE_MAX_TOKEN:
            return
        cache = self._cache
        if token in cache:  # verified twice at once: keep one entry, counted once
            self._forget(token)
        size = _entry_size(token, identity)
        while cache and (len(cache) >= _TOKEN_CACHE_MAX or self._cache_bytes + size > _TOKEN_CACHE_BYTES):
            self._forget(next(iter(cache)))  # dicts keep insertion order: the first is the oldest
        valid_until = min(identity.expires_at + self._settings.leeway_seconds, now + _TOKEN_CACHE_SECONDS)
        cache[token] = (identity, valid_until, size)
        self._cache_bytes += size

    def _forget(self, token: str) -> None:
        entry = self._cache.pop(token, None)
        if entry is not None:
            self._cache_bytes -= entry[2]

    async def _verify(self, token: str, now: float, require_tenant: bool = True) -> Identity:
        if not _COMPACT_JWS.fullmatch(token):
            raise AuthError("malformed", "the token is not a well-formed JWT")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError, RecursionError):  # older PyJWT: RecursionError escapes
            raise AuthError("malformed", "the token is not a well-formed JWT") from None
        if "crit" in header:
            # RFC 7515 §4.1.11: a listed extension that is not understood makes the JWS invalid, and
            # none is understood here (PyJWT before 2.12 did not check `crit` at all).
            raise AuthError("malformed", "the token names critical header extensions, none of which are supported")
        if header.get("b64", True) is not True:
            raise AuthError("malformed", "the token's payload is not base64url-encoded (b64)")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise AuthError("disallowed_alg", f"the token's algorithm {str(algorithm)[:16]!r} is not allowed")
        key = await self._key_for(algorithm, header.get("kid"))
        settings = self._settings
        try:
            claims = jwt.decode(
                token, key, algorithms=[algorithm], issuer=settings.issuer, audience=settings.audience,
                leeway=settings.leeway_seconds, options=self._options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("not_yet_valid", "the token is not valid yet") from None
        except jwt.InvalidIssuerError:
            raise AuthError("bad_issuer", "the token was not issued by the expected issuer") from None
        except jwt.InvalidAudienceError:
            raise AuthError("bad_audience", "the token is not meant for this audience") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("invalid_claim", f"the token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError:
            raise AuthError("malformed", "the token could not be decoded") from None
        except (ValueError, TypeError, OverflowError, RecursionError):
            # What older PyJWT releases let escape for a signed but odd payload (deep nesting, say).
            raise AuthError("malformed", "the token could not be decoded") from None
        self._check_times(claims, now)
        return self._identity(claims, now, require_tenant)

    def _check_times(self, claims: Mapping[str, Any], now: float) -> None:
        """`exp`, `nbf` and `iat`: NumericDates from 1970 to 9999, and now within them (give or take the leeway)."""
        for name in _NUMERIC_DATES:
            if name in claims:
                value = claims[name]
                # Compared, not converted: float(10**400) would raise. NaN and the infinities fail the range.
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= _NUMERIC_DATE_MAX:
                    raise AuthError("invalid_claim", f"the token's {name!r} claim is not a NumericDate "
                                    "(a number of seconds from 1970 to 9999)")
        leeway = self._settings.leeway_seconds
        if claims["exp"] <= now - leeway:
            raise AuthError("expired", "the token has expired")
        if claims.get("nbf", 0) > now + leeway or claims.get("iat", 0) > now + leeway:
            raise AuthError("not_yet_valid", "the token is not valid yet")

    async def _key_for(self, algorithm: str, kid: Any) -> Any:
        kind = family(algorithm)
        if kind == "hmac":
            if self._secret is None:
                raise AuthError("disallowed_alg", "HMAC-signed tokens are not accepted here")
            return self._secret
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed", "the token's 'kid' header is not a string")
        key = self._public_key(algorithm, kid)
        if key is None and self._jwks is not None and await self._jwks.refresh_for_unknown_kid():
            key = self._public_key(algorithm, kid)  # the IdP may have rotated its keys
        if key is not None:
            return key
        if self._jwks is not None and not self._jwks.has_keys and self._pem_key is None:
            raise AuthError("no_keys", "no signing keys are available to verify the token")
        raise AuthError("unknown_key", "no known key matches the token's 'kid' and algorithm")

    def _public_key(self, algorithm: str, kid: str | None) -> Any:
        jwks = self._jwks
        if jwks is not None and kid is not None:
            jwk = jwks.key(kid)
            if jwk is None:
                return None
            if not _fits(jwk.key, algorithm) or jwk.algorithm not in (None, algorithm):
                raise AuthError("disallowed_alg", "the key named by 'kid' is not for this algorithm")
            return jwk.key
        if self._pem_key is not None and _fits(self._pem_key, algorithm):
            return self._pem_key
        if jwks is not None:
            candidates = [k.key for k in jwks.keys() if _fits(k.key, algorithm)]
            if len(candidates) == 1:  # no kid: only unambiguous when a single key could have signed
                return candidates[0]
        return None

    def _identity(self, claims: dict[str, Any], now: float, require_tenant: bool = True) -> Identity:
        settings = self._settings
        tenant = claims.get(settings.tenant_claim)
        if tenant is None or tenant == "":
            if require_tenant:
                raise self._missing_tenant()
            tenant = ""
        elif not isinstance(tenant, str) or not TENANT_ID.fullmatch(tenant):
            raise AuthError("invalid_claim", f"the token's {settings.tenant_claim!r} claim is not a valid "
                            "tenant id (1-64 of A-Z a-z 0-9 . _ : -)")
        plan = None
        if settings.plan_claim is not None and claims.get(settings.plan_claim) is not None:
            plan = claims[settings.plan_claim]
            if not isinstance(plan, str) or not _PLAN_NAME.fullmatch(plan):
                raise AuthError("invalid_claim",
                                f"the token's {settings.plan_claim!r} claim is not a plan name")
        subject = claims.get("sub")
        if subject is not None:
            # Printable excludes controls (CR, LF, NUL, NEL), line and paragraph separators and lone surrogates.
            if not isinstance(subject, str) or len(subject) > _SUBJECT_MAX or not subject.isprintable():
                raise AuthError("invalid_claim", "the token's 'sub' claim is not a printable string")
            subject = quote(subject, safe=_SUBJECT_SAFE)
        return Identity(tenant=tenant, subject=subject, plan=plan, scopes=_scopes(claims),
                        expires_at=float(claims["exp"]), claims=claims)


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """OAuth scopes from `scope` (space-separated, RFC 8693) or `scp` (a list, as some IdPs send)."""
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        return frozenset(s for s in scp if isinstance(s, str))
    if isinstance(scp, str):
        return frozenset(scp.split())
    return frozenset()


def bearer_token(authorization: str | None) -> str:
    """The credentials of an `Authorization: Bearer <token>` value, or AuthError.

    Only SP and HTAB around them are ignored, and they must be visible ASCII: bytes that are not
    UTF-8 (which arrive as lone surrogates), NBSP, NEL or any other character make them malformed,
    before any parser or comparison sees them.
    """
    token = _credentials(authorization)
    if not _CREDENTIALS.fullmatch(token):
        raise AuthError("malformed", "the bearer token is not a well-formed token (visible ASCII)")
    return token


def _credentials(authorization: str | None) -> str:
    """What follows `Bearer ` (SP and HTAB around it ignored), at most 8 KiB; its characters unchecked."""
    if authorization is None or not authorization.strip(_OWS):
        raise AuthError("missing", "a bearer token is required", token_presented=False)
    scheme, _, token = authorization.strip(_OWS).partition(" ")
    token = token.strip(_OWS)
    if scheme.lower() != "bearer" or not token:
        raise AuthError("malformed", "the Authorization header must be 'Bearer <token>'")
    if len(token) > _MAX_TOKEN_LENGTH:
        raise AuthError("malformed", "the bearer token is longer than 8 KiB")
    return token


def _entry_size(token: str, identity: Identity) -> int:
    """Estimated bytes of a cache entry: the token, every object of its claims, and a fixed overhead."""
    size = sys.getsizeof(token) + _TOKEN_CACHE_ENTRY_OVERHEAD
    pending: list[Any] = [identity.claims]
    while pending:  # iterative: claims may nest as deep as the JSON parser allowed
        value = pending.pop()
        size += sys.getsizeof(value)
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return size
