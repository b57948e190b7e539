"""Hostile input on a raw socket (PRODUCT.md §3): framing, header hygiene, pipelining, slow clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway.app import Worker
from gateway.cli.devservices import RedisProcess
from tests.support import Upstream, bearer, settings_for, upstream_app

TOKEN = bearer()["Authorization"]


class Harness:
    def __init__(self, worker: Worker, seen: list[web.BaseRequest]) -> None:
        self.worker = worker
        self.seen = seen

    async def exchange(self, raw: bytes, wait: float = 5.0) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.worker.proxy_port)
        writer.write(raw)
        try:
            return await asyncio.wait_for(reader.read(), wait)
        finally:
            writer.close()


@pytest.fixture
async def harness(redis_server: RedisProcess, sqlite_url: str) -> AsyncIterator[Harness]:
    seen: list[web.BaseRequest] = []
    upstream = await Upstream(upstream_app(record=seen)).start()
    worker = Worker(settings_for(upstream.url, redis_server.url, sqlite_url,
                                 listen={"header_timeout": 1, "max_connections": 20}))
    await worker.start()
    yield Harness(worker, seen)
    await worker.stop()
    await upstream.close()


def request(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode() + body


AMBIGUOUS = {
    "cl-and-te": request(f"POST /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\nContent-Length: 5\n"
                         "Transfer-Encoding: chunked\n\n", b"0\r\n\r\nGET /api/smuggled HTTP/1.1\r\n\r\n"),
    "two-lengths": request(f"POST /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\nContent-Length: 5\n"
                           "Content-Length: 6\n\n", b"hello!"),
    "te-obfuscated": request(f"POST /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\n"
                             "Transfer-Encoding: xchunked\n\n", b"5\r\nhello\r\n0\r\n\r\n"),
    "te-unknown-coding": request(f"POST /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\n"
                                 "Transfer-Encoding: gzip, chunked, identity\n\n", b"5\r\nhello\r\n0\r\n\r\n"),
    "te-space-before-colon": request(f"POST /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\n"
                                     "Transfer-Encoding : chunked\n\n", b"5\r\nhello\r\n0\r\n\r\n"),
    "bad-chunk-size": request(f"POST /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\n"
                              "Transfer-Encoding: chunked\n\n", b"zz\r\nhello\r\n0\r\n\r\n"),
    "negative-length": request(f"POST /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\nContent-Length: -1\n\n"),
    "nul-in-header": request(f"GET /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\nX-A: a\0b\n\n"),
    "bare-cr-in-header": request(f"GET /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\nX-A: a\rb\n\n"),
    "obs-fold": request(f"GET /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\nX-A: a\n b\n\n"),
    "space-in-target": request(f"GET /api/x y HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\n\n"),
}


@pytest.mark.parametrize("name", sorted(AMBIGUOUS))
async def test_ambiguous_framing_refused_and_closed(harness: Harness, name: str) -> None:
    response = await harness.exchange(AMBIGUOUS[name])
    # A head the parser refused has no trustworthy version: aiohttp answers as HTTP/1.0.
    assert response.split(b" ", 2)[1] == b"400", response[:100]
    assert b"application/problem+json" in response and b"invalid-request" in response
    # The connection was closed after the 400 (read() returned), and nothing reached the upstream.
    assert response.count(b"HTTP/1.") == 1
    assert harness.seen == []


async def test_oversized_header_and_target(harness: Harness) -> None:
    big_header = await harness.exchange(request(f"GET /api/x HTTP/1.1\nHost: x\nX-Big: {'a' * 20000}\n\n"))
    assert big_header.split(b" ")[1] in (b"400", b"431")
    long_target = await harness.exchange(request(f"GET /api/{'a' * 20000} HTTP/1.1\nHost: x\n\n"))
    assert long_target.split(b" ")[1] in (b"400", b"414")
    assert harness.seen == []


async def test_each_pipelined_request_authenticated_on_its_own(harness: Harness) -> None:
    raw = request(f"GET /api/one HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\n\n"
                  "GET /api/two HTTP/1.1\nHost: x\nConnection: close\n\n")
    response = await harness.exchange(raw)
    assert response.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 401" in response
    assert [r.raw_path for r in harness.seen] == ["/api/one"]


async def test_forwarded_request_has_exactly_one_framing(harness: Harness) -> None:
    raw = request(f"POST /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\nTransfer-Encoding: chunked\n"
                  "Connection: close\n\n", b"5\r\nhello\r\n0\r\n\r\n")
    response = await harness.exchange(raw)
    assert response.startswith(b"HTTP/1.1 200")
    forwarded = harness.seen[0]
    framing = [k for k, _ in forwarded.raw_headers if k.lower() in (b"content-length", b"transfer-encoding")]
    assert len(framing) == 1


async def test_token_claims_cannot_inject_headers(harness: Harness) -> None:
    evil = bearer("acme", sub="x\r\nX-Injected: 1")["Authorization"]
    response = await harness.exchange(request(f"GET /api/x HTTP/1.1\nHost: x\nAuthorization: {evil}\n"
                                              "Connection: close\n\n"))
    assert response.startswith(b"HTTP/1.1 401")
    assert harness.seen == []


async def test_slow_client_is_cut_and_others_are_served(harness: Harness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.worker.proxy_port)
    writer.write(b"GET /api/x HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
    response = await harness.exchange(request(f"GET /api/x HTTP/1.1\nHost: x\nAuthorization: {TOKEN}\n"
                                              "Connection: close\n\n"))
    assert response.startswith(b"HTTP/1.1 200")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the header timeout
    writer.close()


async def test_connection_limit(harness: Harness) -> None:
    idle = [await asyncio.open_connection("127.0.0.1", harness.worker.proxy_port) for _ in range(20)]
    try:
        await asyncio.sleep(0.05)
        response = await harness.exchange(request("GET /health HTTP/1.1\nHost: x\n\n"))
        assert response.startswith(b"HTTP/1.1 503")
        head, _, body = response.partition(b"\r\n\r\n")
        assert b"Content-Type: application/problem+json" in head and b"Retry-After: 1" in head
        problem = json.loads(body)  # a problem+json like every other error of the gateway's
        assert problem["status"] == 503 and problem["type"].endswith("/overloaded")
    finally:
        for _, writer in idle:
            writer.close()
