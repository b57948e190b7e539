"""Who is calling: JWT verification for the proxy and admin listeners (PRODUCT.md §1-§4).

A token is checked with the key source of its algorithm family only: HS* with the configured
secret, RS*/PS*/ES*/EdDSA with the JWKS keys or the PEM public key file. So an HMAC token can never
be "verified" with a public key used as a secret. Keys named inside a token (`jku`, `x5u`, `jwk`,
`x5c`) are never fetched or trusted. A verified token is cached until it expires, so the hot path
parses each token once.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.config import AuthSettings
from gateway.jwks import JwksCache
from metering.meters import glob_to_regex

TENANT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_PLAN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SUBJECT_MAX = 255
_TOKEN_CACHE_MAX = 10_000
# A cached verification is trusted for at most this long, so a key dropped from the JWKS stops working.
_TOKEN_CACHE_SECONDS = 300.0
_MAX_TOKEN_LENGTH = 8192
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1", "ES256K": "secp256k1"}
# Percent-encodings that could turn into a dot-segment, a slash or a backslash after decoding.
_ENCODED_SEPARATORS = re.compile(r"%(2e|2f|5c|25)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller."""

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
        self._public = [glob_to_regex(p) for p in settings.public_paths]
        self._cache: dict[str, tuple[Identity, float]] = {}
        self._options = {"require": ["exp"], "verify_aud": settings.audience is not None}

    async def start(self) -> None:
        if self._jwks is not None:
            await self._jwks.start()

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()

    def is_public(self, path: str) -> bool:
        """Whether `path` (raw, as sent) is under `public_paths`.

        A path that could be normalised into something else downstream (dot-segments, encoded
        slashes, backslashes, double encoding) is never public, so it cannot escape the allow-list.
        """
        if not self._public or _ENCODED_SEPARATORS.search(path) or "\\" in path:
            return False
        decoded = unquote(path)
        if any(segment in (".", "..") for segment in decoded.split("/")):
            return False
        return any(pattern.match(decoded) for pattern in self._public)

    async def authenticate(self, authorization: str | None, *, require_tenant: bool = True) -> Identity:
        """The identity behind an `Authorization` header value, or AuthError.

        `require_tenant=False` (the admin API) accepts a token without the tenant claim; its
        identity then has `tenant == ""`.
        """
        token = _bearer_token(authorization)
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            identity, valid_until = cached
            if now < valid_until:
                if require_tenant and not identity.tenant:
                    raise self._missing_tenant()
                return identity
            del self._cache[token]
        identity = await self._verify(token, now, require_tenant)
        self._remember(token, identity, now)
        return identity

    def _missing_tenant(self) -> AuthError:
        claim = self._settings.tenant_claim
        return AuthError("missing_tenant", f"the token has no {claim!r} claim", status=403)

    def _remember(self, token: str, identity: Identity, now: float) -> None:
        if len(self._cache) >= _TOKEN_CACHE_MAX:
            # Oldest first (dicts keep insertion order): cheap and good enough for a bounded cache.
            for stale in list(self._cache)[: _TOKEN_CACHE_MAX // 10]:
                del self._cache[stale]
        self._cache[token] = (identity, min(identity.expires_at + self._settings.leeway_seconds,
                                            now + _TOKEN_CACHE_SECONDS))

    async def _verify(self, token: str, now: float, require_tenant: bool = True) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed", "the token is not a well-formed JWT") from None
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
        return self._identity(claims, now, require_tenant)

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
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)
                                   or not math.isfinite(value)):
                raise AuthError("invalid_claim", f"the token's {name!r} claim is not a finite number")
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
        if subject is not None and (not isinstance(subject, str) or len(subject) > _SUBJECT_MAX
                                    or not subject.isprintable()):
            raise AuthError("invalid_claim", "the token's 'sub' claim is not a printable string")
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


def _bearer_token(authorization: str | None) -> str:
    if authorization is None or not authorization.strip():
        raise AuthError("missing", "a bearer token is required", token_presented=False)
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("malformed", "the Authorization header must be 'Bearer <token>'")
    if len(token) > _MAX_TOKEN_LENGTH or " " in token:
        raise AuthError("malformed", "the bearer token is not a well-formed JWT")
    return token


def mint_token(secret: str, *, tenant: str, tenant_claim: str = "org_id", plan: str | None = None,
               ttl: int = 3600, scope: str | None = None, issuer: str | None = None,
               audience: str | None = None, subject: str | None = None, plan_claim: str = "plan") -> str:
    """A development HS256 token, as the `token` command prints it."""
    if not TENANT_ID.fullmatch(tenant):
        raise ValueError("tenant: 1-64 characters of A-Z a-z 0-9 . _ : -")
    now = int(time.time())
    claims: dict[str, Any] = {tenant_claim: tenant, "sub": subject or f"dev:{tenant}", "iat": now,
                              "exp": now + ttl, "jti": uuid.uuid4().hex}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    if plan:
        claims[plan_claim] = plan
    if scope:
        claims["scope"] = scope
    return jwt.encode(claims, secret, algorithm="HS256")
