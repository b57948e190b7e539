"""Keys, tokens and a real JWKS HTTP server for the authentication tests."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support import AUDIENCE, ISSUER


@dataclass
class KeyPair:
    kid: str
    private: Any
    alg: str

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def jwk(self, **extra: Any) -> dict[str, Any]:
        algorithm = jwt.algorithms.RSAAlgorithm if self.alg.startswith(("RS", "PS")) else jwt.algorithms.ECAlgorithm
        data = json.loads(algorithm.to_jwk(self.private.public_key()))
        data.update({"kid": self.kid, "use": "sig"}, **extra)
        return data

    def sign(self, claims: dict[str, Any] | None = None, *, kid: str | None = "default",
             alg: str | None = None, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
        header = dict(headers or {})
        if kid == "default":
            header["kid"] = self.kid
        elif kid is not None:
            header["kid"] = kid
        return jwt.encode(claims_for(claims, **overrides), self.private, algorithm=alg or self.alg,
                          headers=header)


def rsa_pair(kid: str = "rsa-1", alg: str = "RS256") -> KeyPair:
    return KeyPair(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), alg)


def ec_pair(kid: str = "ec-1") -> KeyPair:
    return KeyPair(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")


def claims_for(claims: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "org_id": "acme",
                            "iat": now, "exp": now + 600}
    base.update(claims or {})
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


@dataclass
class JwksServer:
    """A JWKS endpoint whose keys and availability the test controls; it counts fetches."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    up: bool = True
    fetches: int = 0
    runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", self._serve)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/jwks.json"

    async def _serve(self, _: web.Request) -> web.Response:
        self.fetches += 1
        if not self.up:
            return web.Response(status=503)
        return web.json_response({"keys": self.keys})

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
