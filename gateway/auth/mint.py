"""Development tokens: what `cosmos-gateway token` and the demo mint with the configured HS256 secret."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from metering.keys import TENANT_ID


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
