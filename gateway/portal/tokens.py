"""The usage page's signed values: one-time links, page sessions and their CSRF tokens (pure, no I/O).

Several worker processes share the proxy port (SO_REUSEPORT), so nothing is kept in a process: a link and a
session carry the tenant, their expiry and a random id, HMAC-signed with a key every worker derives alike from
the configured secrets (admin tokens, the HS256 secret, the Stripe keys); changing one of them ends every
link and session. Without any secret (JWKS only, dry run, no admin token) the key is random per process:
links and sessions then hold on one worker only, as the console's sessions do (gateway/console/session.py).
That a link works once is Redis's to enforce (gateway/portal/endpoints.py): the signature only says that the
gateway issued it, for that tenant, until then.

    link      p1.<payload>.<mac>   payload = base64url(JSON [tenant, expires, id])
    session   s1.<payload>.<mac>   the cookie of the page; its CSRF token is an HMAC of its id

The purpose is inside the MAC, so a link is never a session nor the other way round, and neither is a console
cookie (another key and label). The signing itself is gateway/signing.py's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.signing import Signer, derive_key, pack, random_id, unpack
from metering.keys import TENANT_ID

LINK_SECONDS = 10 * 60  # PRODUCT.md §6a: "about 10 minutes"
SESSION_SECONDS = 30 * 60  # the page stays open (and reloadable) this long after the link was used
MAX_TOKEN_CHARS = 512  # what is read of a link or cookie at most: a longer one is none of ours
_LABEL = b"cosmos-gateway tenant usage page v1"
_LINK, _SESSION = "p1", "s1"


def portal_key(secrets_in_config: Iterable[str | None]) -> bytes:
    """The signing key: the same in every worker of one configuration, another once a secret changes."""
    return derive_key(_LABEL, sorted(secret for secret in secrets_in_config if secret))


@dataclass(frozen=True, slots=True)
class Signed:
    """What a link or a session says: whose, until when (epoch seconds), and its random id."""

    tenant: str
    expires: int
    id: str


class PortalTokens:
    """Issues and checks links, page sessions and CSRF tokens with one key; `now` is epoch seconds."""

    def __init__(self, key: bytes) -> None:
        self._signer = Signer(key)

    def _issue(self, purpose: str, tenant: str, expires: int) -> tuple[str, Signed]:
        signed = Signed(tenant, expires, random_id())
        payload = pack([tenant, expires, signed.id])
        return f"{purpose}.{payload}.{self._signer.text_mac(purpose, payload)}", signed

    def _read(self, purpose: str, text: str | None, now: float) -> Signed | None:
        if not text or len(text) > MAX_TOKEN_CHARS:
            return None
        head, _, rest = text.partition(".")
        payload, _, mac = rest.partition(".")
        if head != purpose or not self._signer.matches(purpose, payload, mac):
            return None
        fields = unpack(payload)
        if fields is None or len(fields) != 3:
            return None
        tenant, expires, token_id = fields
        if not (isinstance(tenant, str) and TENANT_ID.fullmatch(tenant) and type(expires) is int
                and isinstance(token_id, str)) or expires <= now:
            return None
        return Signed(tenant, expires, token_id)

    def link(self, tenant: str, now: float) -> tuple[str, Signed]:
        """A new link token of `tenant`, valid LINK_SECONDS."""
        return self._issue(_LINK, tenant, int(now) + LINK_SECONDS)

    def read_link(self, token: str | None, now: float) -> Signed | None:
        """The link's content, or None: forged, malformed, too long or expired (used is Redis's to say)."""
        return self._read(_LINK, token, now)

    def session(self, tenant: str, now: float) -> tuple[str, Signed]:
        """A new page session (the cookie value) of `tenant`, valid SESSION_SECONDS."""
        return self._issue(_SESSION, tenant, int(now) + SESSION_SECONDS)

    def read_session(self, cookie: str | None, now: float) -> Signed | None:
        return self._read(_SESSION, cookie, now)

    def csrf_token(self, session: Signed) -> str:
        return self._signer.text_mac("csrf", session.id)

    def csrf_ok(self, session: Signed, presented: str | None) -> bool:
        if not presented or len(presented) > 128:
            return False
        return self._signer.matches("csrf", session.id, presented)
