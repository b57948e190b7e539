"""Stateless console sessions: an HMAC-signed cookie with an expiry, and the CSRF token of each session.

The admin listener may be served by several worker processes (SO_REUSEPORT), so a session is not kept
anywhere: the cookie carries the actor, the expiry and a random nonce, signed with a key that every worker
derives alike from the configured secrets (the admin tokens and the HS256 secret). Rotating an admin token
changes the key and so ends every session. Without any such secret (JWKS-only sign-in) the key is random per
process: sessions then hold on one worker only, which `serve --workers 1` is.

The CSRF token of a session is an HMAC of its nonce: a form carries it, every POST is checked against it.
A signed-out browser gets a short-lived pre-session cookie so the sign-in form has a token of its own.
The signing itself is gateway/signing.py's, shared with the tenants' usage page.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.signing import Signer, derive_key, pack, random_id, unpack

SESSION_COOKIE = "cosmos_console"
PRESESSION_COOKIE = "cosmos_console_pre"
SESSION_SECONDS = 8 * 3600  # a working day; a JWT session ends with its token if that is sooner
PRESESSION_SECONDS = 3600
MAX_COOKIE_CHARS = 1024  # what is read of a cookie at most: a longer one is no session of ours
_LABEL = b"cosmos-gateway console session v1"


def session_key(admin_tokens: tuple[tuple[str, str], ...], hs256_secret: str | None) -> bytes:
    """The signing key: the same in every worker of one configuration, different once a secret changes."""
    material = [f"{name}:{token}" for name, token in sorted(admin_tokens)]
    if hs256_secret:
        material.append(f"hs256:{hs256_secret}")
    return derive_key(_LABEL, material)


@dataclass(frozen=True, slots=True)
class Session:
    actor: str  # "token:<name>" or "jwt:<subject>", as the admin API names it in the audit trail
    expires: int  # epoch seconds
    nonce: str


class Sessions:
    """Issues and checks session cookies (`<payload>.<mac>`) and CSRF tokens with one key; `now` is epoch
    seconds."""

    def __init__(self, key: bytes) -> None:
        self._signer = Signer(key)

    def issue(self, actor: str, now: float, *, not_after: float | None = None) -> tuple[str, Session]:
        """A new session of `actor` (its cookie value, and itself); it ends at `not_after` if that is sooner."""
        expires = int(now) + SESSION_SECONDS
        if not_after is not None:
            expires = min(expires, int(not_after))
        session = Session(actor, expires, random_id())
        payload = pack([session.actor, session.expires, session.nonce])
        return f"{payload}.{self._signer.text_mac('session', payload)}", session

    def read(self, cookie: str | None, now: float) -> Session | None:
        """The session of a cookie value, or None: missing, too long, forged, malformed or expired."""
        if not cookie or len(cookie) > MAX_COOKIE_CHARS:
            return None
        payload, _, signature = cookie.partition(".")
        if not self._signer.matches("session", payload, signature):
            return None
        fields = unpack(payload)
        if fields is None or len(fields) != 3:
            return None
        actor, expires, nonce = fields
        if not (isinstance(actor, str) and type(expires) is int and isinstance(nonce, str)) or expires <= now:
            return None
        return Session(actor, expires, nonce)

    def csrf_token(self, nonce: str) -> str:
        """The CSRF token of a session (or of a pre-session nonce, for the sign-in form)."""
        return self._signer.text_mac("csrf", nonce)

    def csrf_ok(self, nonce: str, presented: str | None) -> bool:
        if not presented or len(presented) > 128:
            return False
        return self._signer.matches("csrf", nonce, presented)

    @staticmethod
    def new_nonce() -> str:
        return random_id()
