"""A hostile or failing upstream behind a real `cosmos-gateway serve` (PRODUCT.md §3, issue 9 §7, §9):
a request is sent twice only when that is safe, and a response head is bounded in size."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.gateway.conftest import StartGateway
from tests.rawupstream import Conn, Handler, RawServer, reply
from tests.support import GatewayProcess, bearer

pytestmark = pytest.mark.timeout(60)

TOKEN = bearer()["Authorization"]
StartBehind = Callable[[Handler], Awaitable[tuple[GatewayProcess, RawServer]]]


@pytest.fixture
def start(start_gateway: StartGateway) -> StartBehind:
    async def make(handler: Handler) -> tuple[GatewayProcess, RawServer]:
        upstream = await RawServer(handler).start()
        return start_gateway(upstream), upstream

    return make


async def send(gateway: GatewayProcess, method: str, path: str, body: bytes = b"") -> bytes:
    """One request on its own connection (a raw socket: no client library retries anything)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    try:
        return await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()


def status_of(response: bytes) -> bytes:
    return response.split(b" ", 2)[1]


# ------------------------------------------------------------------------------ never twice


async def answers_first_then_drops_the_next(conn: Conn) -> None:
    """Answers the first request of each connection (kept alive), reads the second and closes unanswered:
    a kept-alive connection that fails just as it carries a request."""
    await conn.read_request()
    await conn.send(reply(b"first"))
    await conn.read_request()


async def test_a_post_is_never_sent_twice_a_get_is_retried_once(start: StartBehind) -> None:
    gateway, upstream = await start(answers_first_then_drops_the_next)

    def seen(line: bytes) -> int:
        return sum(1 for conn in upstream.conns for request in conn.requests if request.line == line)

    assert status_of(await send(gateway, "GET", "/api/warm-1")) == b"200"
    response = await send(gateway, "POST", "/api/deploy", b'{"chain": "c1"}')
    assert status_of(response) == b"502", response[:200]
    assert seen(b"POST /api/deploy HTTP/1.1") == 1

    assert status_of(await send(gateway, "GET", "/api/warm-2")) == b"200"
    response = await send(gateway, "GET", "/api/read")
    assert status_of(response) == b"200", response[:200]  # retried on a fresh connection, which answered
    assert seen(b"GET /api/read HTTP/1.1") == 2


# ------------------------------------------------------------------------------ response head size


@pytest.mark.parametrize("head", ["one-huge-header", "many-headers", "never-ending-header"])
async def test_an_oversized_response_head_is_a_502(start: StartBehind, head: str) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        if head == "one-huge-header":
            await conn.send(reply(extra=b"X-Huge: " + b"h" * 70_000 + b"\r\n"))
        elif head == "many-headers":
            await conn.send(reply(extra=b"".join(b"X-Many-%d: m\r\n" % i for i in range(300))))
        else:  # a header value that never ends: what httptools buffers must stay bounded
            await conn.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
            for _ in range(64):
                await conn.send(b"e" * 16_384)
        await conn.wait_closed_by_peer()

    gateway, _ = await start(handler)
    response = await send(gateway, "GET", "/api/x")
    assert status_of(response) == b"502", response[:200]
    assert b"bad-gateway" in response


async def test_a_large_but_bounded_response_head_passes(start: StartBehind) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(reply(extra=b"".join(b"Set-Cookie: c%d=%s\r\n" % (i, b"v" * 400) for i in range(100))))
        await conn.wait_closed_by_peer()

    gateway, _ = await start(handler)
    response = await send(gateway, "GET", "/api/x")
    assert status_of(response) == b"200", response[:200]
    assert response.count(b"Set-Cookie: ") == 100
