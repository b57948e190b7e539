"""Request bodies under hostile input (PRODUCT.md §3, §5): byte-exact, never inflated, bounded in time,
and `Expect: 100-continue` decided before the body is read. A real `cosmos-gateway serve` process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.gateway.conftest import StartGateway
from tests.support import GatewayProcess, Upstream, bearer, upstream_app

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
DEPLOY = "/api/chains/c1/deployments"
PLANS: dict[str, Any] = {
    "starter": {"rate": {"per_second": 1000, "burst": 1000}, "quotas": {"chain_deployments": {"limit": 100}}},
    "single": {"rate": {"per_second": 1000, "burst": 1000}, "quotas": {"chain_deployments": {"limit": 1}}},
}


def gzip_of(pieces: Iterator[bytes]) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    return b"".join(compressor.compress(piece) for piece in pieces) + compressor.flush()


# About 200 KiB that inflate to 200 MiB of zeros.
BOMB = gzip_of(bytes(MiB) for _ in range(200))


@dataclass
class Setup:
    gateway: GatewayProcess
    seen: list[web.BaseRequest]

    @property
    def port(self) -> int:
        return self.gateway.proxy_port


@pytest.fixture
async def setup(start_gateway: StartGateway) -> Setup:
    seen: list[web.BaseRequest] = []
    # The test upstream must not inflate either, or it could not tell what the gateway sent.
    upstream = await Upstream(upstream_app(record=seen), auto_decompress=False).start()
    gateway = start_gateway(upstream, listen={"body_timeout": 1}, plans=PLANS, auth={"plan_claim": "plan"})
    return Setup(gateway, seen)


async def pieces(data: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def used(session: aiohttp.ClientSession, setup: Setup, tenant: str, plan: str = "starter") -> float:
    async with session.get(setup.gateway.url + "/_gateway/usage", headers=bearer(tenant, plan=plan)) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["meters"]["chain_deployments"]["used"]


async def eventually_used(session: aiohttp.ClientSession, setup: Setup, tenant: str, expected: float,
                          plan: str = "starter") -> None:
    """Counts are written after the response (batched): poll the usage view for a bounded while."""
    for _ in range(100):
        if await used(session, setup, tenant, plan) == expected:
            return
        await asyncio.sleep(0.05)
    assert await used(session, setup, tenant, plan) == expected


# ------------------------------------------------------------------------------ byte-exact bodies


async def test_bodies_reach_the_upstream_byte_exact_never_inflated(setup: Setup) -> None:
    small = gzip_of(iter([b"hello " * 1000]))
    large = gzip_of(iter([os.urandom(300 * 1024)]))  # random data: compressed, still over 64 KiB
    assert len(small) < 64 * 1024 < len(large)
    not_gzip = os.urandom(5000)
    cases = [
        ("/api/x", small, "sized"), ("/api/x", small, "chunked"),
        ("/api/x", large, "sized"), ("/api/x", large, "chunked"),
        ("/api/x", not_gzip, "sized"), ("/api/x", not_gzip, "chunked"),
        ("/status/bomb", BOMB, "chunked"), ("/status/bomb", BOMB, "sized"), ("/api/x", BOMB, "chunked"),
    ]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for path, body, framing in cases:
            headers = {**bearer(), "Content-Encoding": "gzip", "Content-Type": "application/octet-stream"}
            data = body if framing == "sized" else pieces(body)
            async with session.post(setup.gateway.url + path, headers=headers, data=data) as response:
                assert response.status == 200, (path, len(body), framing, await response.text())
                echoed = await response.json()
            assert echoed["body_size"] == len(body), (path, len(body), framing)
            assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest(), (path, len(body), framing)
            assert echoed["chunked"] == (framing == "chunked")
            assert ["Content-Encoding", "gzip"] in echoed["headers"]


# ------------------------------------------------------------------------------ body timeout


async def test_a_stalled_body_times_out_closes_and_counts_nothing(setup: Setup) -> None:
    async with aiohttp.ClientSession() as session:
        for head_framing, first in (("Content-Length: 100", b"x" * 10),  # read whole: the small path
                                    ("Content-Length: 200000", b"x" * 10),  # streamed, sized
                                    ("Transfer-Encoding: chunked", b"a\r\n" + b"x" * 10 + b"\r\n")):
            reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
            token = bearer("stalled")["Authorization"]
            writer.write(f"POST {DEPLOY} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
                         f"{head_framing}\r\n\r\n".encode() + first)
            try:
                # body_timeout is 1 s: the answer comes well before this deadline.
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 408"), head
                assert b"connection: close" in head.lower()
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                problem = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
                assert problem["type"].endswith("/request-timeout") and problem["status"] == 408
                # Nothing more comes on this connection: it is closed at once, not after a lingering read.
                assert await asyncio.wait_for(reader.read(), 3) == b""
            finally:
                writer.close()
        # None of the three deployments was counted: the upstream never received a whole request.
        await eventually_used(session, setup, "stalled", 0)


async def test_a_slow_but_steady_body_is_not_cut(setup: Setup) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
    token = bearer()["Authorization"]
    writer.write(f"POST /api/x HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
                 "Content-Length: 8\r\nConnection: close\r\n\r\n".encode())
    try:
        for byte in b"steadily":  # 8 gaps of 0.3 s: 2.4 s in all, each gap below body_timeout (1 s)
            await asyncio.sleep(0.3)
            writer.write(bytes([byte]))
        response = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    assert json.loads(response.partition(b"\r\n\r\n")[2])["body_size"] == 8


# ------------------------------------------------------------------------------ Expect: 100-continue


def expect_head(path: str, token: str | None, length: int) -> bytes:
    auth = f"Authorization: {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {length}\r\n"
            "Expect: 100-continue\r\n\r\n").encode()


async def test_expect_refusals_are_answered_without_the_body(setup: Setup) -> None:
    async with aiohttp.ClientSession() as session:
        # The one deployment of the "single" plan is used up first.
        async with session.post(setup.gateway.url + DEPLOY, headers=bearer("full", plan="single"),
                                data=b"{}") as response:
            assert response.status == 200
        for token, status in ((None, b"401"), (bearer("full", plan="single")["Authorization"], b"429")):
            reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
            writer.write(expect_head(DEPLOY, token, 1000))  # and never the body
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.split(b" ")[1] == status, head
                assert b"100 Continue" not in head
                assert b"connection: close" in head.lower()
            finally:
                writer.close()
    assert [r for r in setup.seen if r.method == "POST" and r.content_length == 1000] == []


async def test_expect_admitted_gets_100_continue_then_the_body_streams_on(setup: Setup) -> None:
    for length in (1000, 300 * 1024):  # the read-whole and the streamed path
        body = os.urandom(length)
        reader, writer = await asyncio.open_connection("127.0.0.1", setup.port)
        writer.write(expect_head("/api/x", bearer()["Authorization"], length))
        try:
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            size = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            echoed = json.loads(await asyncio.wait_for(reader.readexactly(size), 5))
        finally:
            writer.close()
        assert echoed["body_size"] == length
        assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert not [k for k, _ in echoed["headers"] if k.lower() == "expect"]  # handled here, not forwarded


# ------------------------------------------------------------------------------ abandoned requests

ABANDONED_PLANS: dict[str, Any] = {
    "two": {"rate": {"per_second": 1000, "burst": 1000}, "quotas": {"chain_deployments": {"limit": 2}}}}


async def test_clients_gone_before_the_upstream_got_the_request_keep_nothing(setup: Setup) -> None:
    """PRODUCT.md §5: a request that fails before the upstream received it gives its units back. Three
    clients send half a deployment body (sized and chunked) and leave; the quota of 1 still serves 1."""
    tenant = "halfway"
    token = bearer(tenant, plan="single")["Authorization"]
    heads = [f"Content-Length: 5000\r\n\r\n{'x' * 100}",  # a body read whole (small), cut short
             f"Content-Length: 200000\r\n\r\n{'x' * 100}",  # a streamed body, cut short
             "Transfer-Encoding: chunked\r\n\r\n64\r\n" + "x" * 100 + "\r\n"]  # chunked, no last chunk
    for rest in heads:
        _, writer = await asyncio.open_connection("127.0.0.1", setup.port)
        writer.write(f"POST {DEPLOY} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n{rest}".encode())
        await writer.drain()
        await asyncio.sleep(0.2)  # admitted and counted, body on its way
        writer.close()
    async with aiohttp.ClientSession() as session:
        await eventually_used(session, setup, tenant, 0, plan="single")
        async with session.post(setup.gateway.url + DEPLOY, headers=bearer(tenant, plan="single"),
                                data=b"{}") as response:
            assert response.status == 200, await response.text()
        await eventually_used(session, setup, tenant, 1, plan="single")


async def test_an_unreachable_upstream_bills_nothing_whatever_the_meter_says(start_gateway: StartGateway) -> None:
    """Upstream unreachable → 502, and the units come back even for a meter that bills server errors:
    the upstream never got the request."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    meters = {"api_calls": {"match": {"path": "/api/**"}, "stripe_event": "api_calls"},
              "chain_deployments": {"match": {"method": "POST", "path": "/api/chains/*/deployments"},
                                    "stripe_event": "chain_deployments", "bill_server_errors": True},
              "chains": {"source": "reported", "kind": "gauge"},
              "storage_gb": {"source": "reported", "kind": "gauge"}}
    gateway = start_gateway(f"http://127.0.0.1:{port}", plans=ABANDONED_PLANS, meters=meters, default_plan="two")
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(gateway.url + DEPLOY, headers=bearer("nowhere"), data=b"{}") as response:
                assert response.status == 502, await response.text()
        for _ in range(100):
            async with session.get(gateway.url + "/_gateway/usage", headers=bearer("nowhere")) as response:
                meters_used = (await response.json())["meters"]
            if meters_used["chain_deployments"]["used"] == 0:
                break
            await asyncio.sleep(0.05)
        assert meters_used["chain_deployments"]["used"] == 0, meters_used
