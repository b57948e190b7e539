"""Who may use the admin API: a configured admin token, or a JWT carrying the admin scope.

Admin tokens are kept only as SHA-256 digests. A presented token is hashed and compared with every
configured digest in constant time, without stopping at the first match, so neither the timing
nor the position of a token in GATEWAY_ADMIN_TOKENS leaks. Anything else is verified as a JWT.

Credentials must match exactly: only SP and HTAB around them are ignored (RFC 9110 OWS), never NBSP,
NEL or other Unicode spaces, and anything but visible ASCII is refused before it is hashed or parsed.
"""

from __future__ import annotations

import hashlib
import hmac

from gateway.auth.tokens import Authenticator, AuthError, bearer_token
from gateway.errors import Forbidden, InvalidToken

_NO_MATCH = ""


class AdminAuth:
    def __init__(self, tokens: tuple[tuple[str, str], ...], scope: str, authenticator: Authenticator) -> None:
        self._digests = tuple((name, hashlib.sha256(token.encode()).digest()) for name, token in tokens)
        self._scope = scope
        self._authenticator = authenticator

    async def actor(self, authorization: str | None) -> str:
        """`token:<name>` or `jwt:<subject>` for an allowed caller; InvalidToken (401) or Forbidden (403)."""
        try:
            value = bearer_token(authorization)
            name = self._token_name(value)
            if name is not None:
                return f"token:{name}"
            identity = await self._authenticator.authenticate(authorization, require_tenant=False)
        except AuthError as exc:
            raise InvalidToken(exc.detail, token_presented=exc.token_presented) from None
        if self._scope not in identity.scopes:
            raise Forbidden(f"the token lacks the {self._scope!r} scope required for the admin API")
        return f"jwt:{identity.subject or '-'}"

    def _token_name(self, value: str) -> str | None:
        digest = hashlib.sha256(value.encode("ascii")).digest()  # bearer_token() let only visible ASCII through
        found = _NO_MATCH
        for name, expected in self._digests:
            # Every digest is compared; the match is remembered, never returned early.
            if hmac.compare_digest(digest, expected):
                found = name
        return found or None
