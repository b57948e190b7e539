"""Hostile credentials on the real listeners (PRODUCT.md §3 "Hostile input", §4, §6).

Bytes a client library would refuse to send go out on raw sockets to a real `cosmos-gateway serve`
child process. Every answer must be the right 4xx as problem+json: never aiohttp's text/plain 500,
never a problem+json 500.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import stripe

from gateway.cli.devservices import RedisProcess
from tests.rawhttp import LoopThread
from tests.support import AUDIENCE, ISSUER, SECRET, GatewayProcess, Upstream, running_gateway, token, upstream_app

ADMIN_TOKEN = "ops-token-0123456789abcdef"
WEBHOOK_SECRET = "whsec_hostile_0123456789abcdef"
DEADLINE = 10.0


class ThreadedUpstream:
    """The test upstream on its own event loop in a thread, so a module-scoped gateway can use it."""

    def __init__(self) -> None:
        self._loop = LoopThread()
        self._server: Upstream | None = None

    def start(self) -> str:
        self._server = self._loop.run(Upstream(upstream_app()).start())
        return self._server.url

    def close(self) -> None:
        if self._server is not None:
            self._loop.run(self._server.close())
        self._loop.close()


@pytest.fixture(scope="module")
def gateway_process(redis_process: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    upstream = ThreadedUpstream()
    url = upstream.start()
    try:
        with running_gateway(url, redis_process.url, tmp_path_factory.mktemp("hostile-auth"),
                             env={"STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET},
                             admin={"tokens": f"ops:{ADMIN_TOKEN}"}) as process:
            yield process
    finally:
        upstream.close()


async def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (Connection: close); status, headers (lower-cased), body."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), DEADLINE)
    try:
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def get(path: str, authorization: bytes | None, *extra: bytes) -> bytes:
    head = [b"GET " + path.encode() + b" HTTP/1.1", b"Host: gateway.test", b"Connection: close",
            b"X-Request-Id: hostile-1", *extra]
    if authorization is not None:
        head.append(b"Authorization: " + authorization)
    return b"\r\n".join(head) + b"\r\n\r\n"


def problem(status: int, headers: dict[str, str], body: bytes, expected: int, suffix: str) -> dict[str, Any]:
    assert status == expected, body[:300]
    assert headers["content-type"].startswith("application/problem+json"), headers
    document = json.loads(body)
    assert document["status"] == expected and document["type"].endswith("/" + suffix), document
    assert headers.get("x-request-id") == "hostile-1"
    assert b"Traceback" not in body
    return document


def signed(header: dict[str, Any], payload: str) -> str:
    """An HS256 token signed with the gateway's secret over the payload text exactly as given."""
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps(header).encode()) + "." + b64(payload.encode())
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def claims_text(**numbers: str) -> str:
    """A valid claim set as JSON text, with the given claims written verbatim (e.g. `1e308`, `Infinity`)."""
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "org_id": "acme", "iat": now, "exp": now + 600}
    for name in numbers:
        claims.pop(name, None)
    text = json.dumps(claims)[:-1]
    return text + "".join(f', "{name}": {value}' for name, value in numbers.items()) + "}"


# ------------------------------------------------------------------ bytes that are not UTF-8 or not ASCII


@pytest.mark.parametrize("value", [b"Bearer \xff\xfe\xfd", b"Bearer \xc3\x28", b"Bearer abc\x85", b"Bearer \xa0abc"])
async def test_non_ascii_bearer_on_the_proxy_is_401(gateway_process: GatewayProcess, value: bytes) -> None:
    status, headers, body = await exchange(gateway_process.proxy_port, get("/api/chains", value))
    problem(status, headers, body, 401, "invalid-token")
    assert headers["www-authenticate"] == 'Bearer realm="cosmos-gateway", error="invalid_token"'


@pytest.mark.parametrize("value", [b"Bearer \xff\xfe\xfd", b"Bearer \xc3\x28"])
async def test_non_utf8_bearer_on_the_admin_listener_is_401(gateway_process: GatewayProcess, value: bytes) -> None:
    status, headers, body = await exchange(gateway_process.admin_port, get("/admin/plans", value))
    problem(status, headers, body, 401, "invalid-token")


# (VT, FF and other controls never get this far: the HTTP parser refuses them in a header value.)
@pytest.mark.parametrize("suffix", [b"\xc2\x85", b"\xc2\xa0", b"\x85", b"\xa0", b"\xe2\x80\x83", b"\xe3\x80\x80"])
async def test_admin_token_followed_by_other_whitespace_is_401(gateway_process: GatewayProcess,
                                                                suffix: bytes) -> None:
    value = b"Bearer " + ADMIN_TOKEN.encode() + suffix
    status, headers, body = await exchange(gateway_process.admin_port, get("/admin/plans", value))
    problem(status, headers, body, 401, "invalid-token")


@pytest.mark.parametrize("value", [f"Bearer {ADMIN_TOKEN}", f"Bearer {ADMIN_TOKEN} \t", f"bearer   {ADMIN_TOKEN}"])
async def test_admin_token_with_sp_or_htab_around_it_is_accepted(gateway_process: GatewayProcess,
                                                                 value: str) -> None:
    status, _, body = await exchange(gateway_process.admin_port, get("/admin/plans", value.encode()))
    assert status == 200, body[:300]


@pytest.mark.parametrize("suffix", [b"\xc2\xa0", b"\xc2\x85", b"\x85"])
async def test_jwt_followed_by_other_whitespace_is_401(gateway_process: GatewayProcess, suffix: bytes) -> None:
    value = b"Bearer " + token().encode() + suffix
    status, headers, body = await exchange(gateway_process.proxy_port, get("/api/chains", value))
    problem(status, headers, body, 401, "invalid-token")


# ------------------------------------------------------------------ numbers of any size


@pytest.mark.parametrize("claim, value", [
    ("exp", "1" + "0" * 400),     # 401 digits
    ("exp", "-" + "1" * 401),
    ("exp", "1e308"),
    ("exp", "-1"),
    ("exp", "Infinity"),
    ("exp", "NaN"),
    ("exp", "[1]"),
    ("exp", "{}"),
    ("exp", "true"),
    ("nbf", "1" + "0" * 400),
    ("nbf", "-Infinity"),
    ("nbf", "[]"),
    ("iat", "1" + "0" * 400),
    ("iat", "1e308"),
    ("iat", "-5"),
    ("iat", "Infinity"),
    ("iat", "null"),
])
async def test_time_claims_of_any_size_are_401(gateway_process: GatewayProcess, claim: str, value: str) -> None:
    raw = signed({"alg": "HS256", "typ": "JWT"}, claims_text(**{claim: value}))
    status, headers, body = await exchange(gateway_process.proxy_port, get("/api/chains", b"Bearer " + raw.encode()))
    problem(status, headers, body, 401, "invalid-token")


@pytest.mark.parametrize("header", [
    "[" * 3000 + "]" * 3000,
    '{"alg": "HS256", "x": ' + "[" * 3000 + "]" * 3000 + "}",
])
async def test_deeply_nested_token_header_is_401(gateway_process: GatewayProcess, header: str) -> None:
    head = base64.urlsafe_b64encode(header.encode()).rstrip(b"=")
    raw = head + b"." + base64.urlsafe_b64encode(b"{}").rstrip(b"=") + b".c2ln"
    status, headers, body = await exchange(gateway_process.proxy_port, get("/api/chains", b"Bearer " + raw))
    problem(status, headers, body, 401, "invalid-token")


async def test_deeply_nested_signed_payload_is_401(gateway_process: GatewayProcess) -> None:
    raw = signed({"alg": "HS256"}, claims_text(deep="[" * 2500 + "]" * 2500))
    status, headers, body = await exchange(gateway_process.proxy_port, get("/api/chains", b"Bearer " + raw.encode()))
    problem(status, headers, body, 401, "invalid-token")


@pytest.mark.parametrize("crit", ['["exotic"]', '["b64"]', "[]", '"exotic"'])
async def test_critical_extensions_are_refused(gateway_process: GatewayProcess, crit: str) -> None:
    header = {"alg": "HS256", "crit": json.loads(crit), "exotic": 1, "b64": True}
    raw = signed(header, claims_text())
    status, headers, body = await exchange(gateway_process.proxy_port, get("/api/chains", b"Bearer " + raw.encode()))
    problem(status, headers, body, 401, "invalid-token")


# ------------------------------------------------------------------ what a token says reaches the upstream safely


def _upstream_saw(body: bytes) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in json.loads(body)["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


@pytest.mark.parametrize("subject, forwarded", [
    ("user-1", "user-1"),
    ("auth0|5f1c:x@example.com", "auth0|5f1c:x@example.com"),
    ("日本語", "%E6%97%A5%E6%9C%AC%E8%AA%9E"),
    ("café 100%", "caf%C3%A9%20100%25"),
    ("ÿ", "%C3%BF"),  # Latin-1 encodable, still percent-encoded: one rule for every non-ASCII character
])
async def test_subject_is_forwarded_percent_encoded(gateway_process: GatewayProcess, subject: str,
                                                    forwarded: str) -> None:
    value = b"Bearer " + token(sub=subject).encode()
    status, _, body = await exchange(gateway_process.proxy_port, get("/api/chains", value))
    assert status == 200, body[:300]
    seen = _upstream_saw(body)
    assert seen["x-cosmos-subject"] == [forwarded]
    assert seen["x-cosmos-tenant"] == ["acme"]


@pytest.mark.parametrize("subject", ["evil\r\nX-Cosmos-Tenant: other", "a\x00b", "a\x85b", "a\u2028b",
                                     "x" * 256])
async def test_subject_that_could_break_a_header_is_401(gateway_process: GatewayProcess, subject: str) -> None:
    value = b"Bearer " + token(sub=subject).encode()
    status, headers, body = await exchange(gateway_process.proxy_port, get("/api/chains", value))
    problem(status, headers, body, 401, "invalid-token")


async def test_lone_surrogate_subject_is_401(gateway_process: GatewayProcess) -> None:
    raw = signed({"alg": "HS256"}, claims_text(sub='"\\udc80"'))
    status, headers, body = await exchange(gateway_process.proxy_port, get("/api/chains", b"Bearer " + raw.encode()))
    problem(status, headers, body, 401, "invalid-token")


# ------------------------------------------------------------------ Stripe webhook signatures


@pytest.mark.parametrize("signature", ["t={now},v1=é" + "0" * 63, "t={now},v1=\udcff\udcfe",
                                       "t=١٢٣,v1=" + "0" * 64, "t=" + "9" * 5000 + ",v1=" + "0" * 64])
async def test_stripe_signature_that_is_not_ascii_is_400(gateway_process: GatewayProcess, signature: str) -> None:
    body = b'{"id": "evt_1", "type": "customer.subscription.updated", "created": 1}'
    value = signature.replace("{now}", str(int(time.time()))).encode("utf-8", "surrogateescape")
    raw = (b"POST /_gateway/webhooks/stripe HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
           b"X-Request-Id: hostile-1\r\nContent-Type: application/json\r\n"
           b"Stripe-Signature: " + value + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    status, headers, answer = await exchange(gateway_process.proxy_port, raw)
    assert status == 400, answer[:300]
    assert headers["content-type"].startswith("application/problem+json")
    assert json.loads(answer)["errors"][0]["field"] == "Stripe-Signature"


async def test_stripe_webhook_signed_correctly_passes_the_real_listener(gateway_process: GatewayProcess) -> None:
    body = json.dumps({"id": "evt_hostile_ok", "type": "invoice.paid", "created": int(time.time())})
    header = stripe.WebhookSignature.generate_signature_header(body, WEBHOOK_SECRET)
    raw = (b"POST /_gateway/webhooks/stripe HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n"
           b"Content-Type: application/json\r\nStripe-Signature: " + header.encode() +
           b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body.encode())
    status, _, answer = await exchange(gateway_process.proxy_port, raw)
    assert status == 200, answer[:300]
