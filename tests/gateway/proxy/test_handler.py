"""The proxy of PRODUCT.md §3 against a real upstream, through a real gateway worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.app import Worker
from gateway.cli.devservices import RedisProcess, free_port
from tests.conftest import RunningGateway
from tests.support import Upstream, bearer, settings_for, upstream_app


async def get_json(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.get(url, **kwargs) as response:
        return response.status, await response.json(content_type=None)


def header_values(echoed: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echoed["headers"] if k.lower() == name.lower()]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        yield client


async def test_methods_pass_through(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        async with session.request(method, gateway.url + "/api/x", headers=bearer(), data=b"abc") as response:
            assert response.status == 200
            assert (await response.json())["method"] == method
    async with session.head(gateway.url + "/api/x", headers=bearer()) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) > 0
        assert await response.read() == b""


async def test_raw_path_and_repeated_query_kept(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    url = gateway.url + "/api/a%2Fb/c%20d?x=1&x=2&y=%2F"
    async with session.get(aiohttp.client.URL(url, encoded=True), headers=bearer()) as response:
        assert (await response.json())["raw_path"] == "/api/a%2Fb/c%20d?x=1&x=2&y=%2F"


async def test_identity_headers_replace_spoofed_ones(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    headers = {**bearer("acme"), "X-Cosmos-Tenant": "evil", "x-cosmos-plan": "sovereign", "X-Cosmos-Other": "1"}
    _, echoed = await get_json(session, gateway.url + "/api/x", headers=headers)
    assert header_values(echoed, "X-Cosmos-Tenant") == ["acme"]
    assert header_values(echoed, "X-Cosmos-Plan") == ["starter"]
    assert header_values(echoed, "X-Cosmos-Subject") == ["user-1"]
    assert header_values(echoed, "X-Cosmos-Other") == []


async def test_hop_by_hop_removed_towards_upstream(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    headers = {**bearer(), "Connection": "keep-alive, X-Private", "X-Private": "secret", "Keep-Alive": "timeout=9",
               "TE": "trailers", "Proxy-Authorization": "Basic Zm9v", "X-Public": "ok"}
    _, echoed = await get_json(session, gateway.url + "/api/x", headers=headers)
    names = {k.lower() for k, _ in echoed["headers"]}
    assert {"x-private", "keep-alive", "te", "proxy-authorization"}.isdisjoint(names)
    assert header_values(echoed, "X-Public") == ["ok"]


async def test_hop_by_hop_and_usage_removed_towards_client(gateway: RunningGateway,
                                                         session: aiohttp.ClientSession) -> None:
    async with session.get(gateway.url + "/hop", headers=bearer()) as response:
        assert response.status == 200
        assert "X-Upstream-Secret" not in response.headers
        assert "Keep-Alive" not in response.headers
        assert "Proxy-Authenticate" not in response.headers
        assert "X-Cosmos-Usage" not in response.headers
        assert response.headers["X-Kept"] == "yes"


async def test_two_set_cookie_headers_kept(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    async with session.get(gateway.url + "/cookies", headers=bearer()) as response:
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


async def test_forwarding_headers_end_with_the_peer(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    headers = {**bearer(), "X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6", "X-Forwarded-Host": "evil",
               "X-Forwarded-Proto": "https"}
    _, echoed = await get_json(session, gateway.url + "/api/x", headers=headers)
    # The peer is not a trusted proxy: nothing the client claimed is kept.
    assert header_values(echoed, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(echoed, "X-Forwarded-Proto") == ["http"]
    assert header_values(echoed, "X-Forwarded-Host") == [f"127.0.0.1:{gateway.worker.proxy_port}"]
    forwarded = header_values(echoed, "Forwarded")
    # RFC 7239: a host with a port is not a token, so it is quoted.
    assert forwarded == [f'for=127.0.0.1;proto=http;host="127.0.0.1:{gateway.worker.proxy_port}"']


async def test_trusted_proxy_values_kept_in_front(upstream: Upstream, redis_server: RedisProcess,
                                                  sqlite_url: str, session: aiohttp.ClientSession) -> None:
    worker = Worker(settings_for(upstream.url, redis_server.url, sqlite_url,
                                 listen={"trusted_proxies": ["127.0.0.0/8"]}))
    await worker.start()
    try:
        headers = {**bearer(), "X-Forwarded-For": "203.0.113.7", "Forwarded": "for=203.0.113.7"}
        _, echoed = await get_json(session, f"http://127.0.0.1:{worker.proxy_port}/api/x", headers=headers)
        assert header_values(echoed, "X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
        assert header_values(echoed, "Forwarded")[0].startswith("for=203.0.113.7, for=127.0.0.1;")
    finally:
        await worker.stop()


async def test_request_id_kept_when_sane_else_generated(gateway: RunningGateway,
                                                        session: aiohttp.ClientSession) -> None:
    async with session.get(gateway.url + "/api/x", headers={**bearer(), "X-Request-Id": "abc-123"}) as response:
        assert response.headers["X-Request-Id"] == "abc-123"
        assert header_values(await response.json(), "X-Request-Id") == ["abc-123"]
    async with session.get(gateway.url + "/api/x", headers={**bearer(), "X-Request-Id": "bad id;<x>"}) as response:
        generated = response.headers["X-Request-Id"]
        assert generated != "bad id;<x>" and len(generated) == 24
    async with session.get(gateway.url + "/api/x") as response:  # errors carry one too
        assert response.status == 401 and response.headers["X-Request-Id"]


async def test_public_paths_need_no_token(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    for path in ("/health", "/status", "/status/db/x"):
        async with session.get(gateway.url + path, headers={"X-Cosmos-Tenant": "evil"}) as response:
            assert response.status == 200, path
            assert header_values(await response.json(), "X-Cosmos-Tenant") == []


@pytest.mark.parametrize("path", [
    "/status/../api/chains", "/status/%2e%2e/api/chains", "/status/%2E%2E/api/chains", "/health/../api",
    "/status/.%2e/api", "/health%2F..%2Fapi", "/status/./../api",
])
async def test_dot_segments_never_leave_public_paths(gateway: RunningGateway, path: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.worker.proxy_port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 401") or response.startswith(b"HTTP/1.1 400"), response[:80]


async def test_unauthenticated_gets_problem_json(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    async with session.get(gateway.url + "/api/x") as response:
        assert response.status == 401
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="cosmos-gateway"'
        body = await response.json(content_type=None)
        assert body["type"].endswith("/invalid-token") and body["status"] == 401
    async with session.get(gateway.url + "/api/x", headers={"Authorization": "Bearer nope"}) as response:
        assert response.status == 401
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


async def test_missing_tenant_claim_is_forbidden(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    status, body = await get_json(session, gateway.url + "/api/x", headers=bearer(None))
    assert status == 403 and body["type"].endswith("/forbidden")


async def test_two_authorization_headers_refused(gateway: RunningGateway) -> None:
    token = bearer()["Authorization"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.worker.proxy_port)
    writer.write(f"GET /api/x HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nAuthorization: {token}\r\n"
                 "Connection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 401")


async def test_chunked_and_sized_request_bodies(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    payload = b"z" * 300_000

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 10_000):
            yield payload[i:i + 10_000]

    async with session.post(gateway.url + "/api/x", headers=bearer(), data=chunks()) as response:
        chunked = await response.json()
    async with session.post(gateway.url + "/api/x", headers=bearer(), data=payload) as response:
        sized = await response.json()
    assert chunked["body_size"] == sized["body_size"] == len(payload)
    assert chunked["body_sha256"] == sized["body_sha256"]
    assert chunked["chunked"] and not sized["chunked"]


async def test_chunked_response_streams(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    async with session.get(gateway.url + "/stream/1000000", headers=bearer()) as response:
        assert response.status == 200
        assert len(await response.read()) == 1_000_000


async def test_status_codes_pass_through(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    for code in (201, 204, 304, 404, 500, 503):
        async with session.get(gateway.url + f"/code/{code}", headers=bearer()) as response:
            assert response.status == code


async def test_websocket_echo(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(gateway.url + "/ws", headers=bearer(), protocols=("chat",)) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert (await ws.receive_str(timeout=5)) == "echo:hello"
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive_bytes(timeout=5)) == b"\x00\x01"


async def test_websocket_needs_a_token(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await session.ws_connect(gateway.url + "/ws")
    assert info.value.status == 401


async def test_websocket_refused_upstream_is_502(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await session.ws_connect(gateway.url + "/cookies", headers=bearer())
    assert info.value.status == 502


async def test_upstream_refused_is_502(redis_server: RedisProcess, sqlite_url: str,
                                       session: aiohttp.ClientSession) -> None:
    worker = Worker(settings_for(f"http://127.0.0.1:{free_port()}", redis_server.url, sqlite_url))
    await worker.start()
    try:
        status, body = await get_json(session, f"http://127.0.0.1:{worker.proxy_port}/api/x", headers=bearer())
        assert status == 502 and body["type"].endswith("/bad-gateway")
    finally:
        await worker.stop()


async def test_slow_upstream_is_504(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    status, body = await get_json(session, gateway.url + "/slow?delay=10", headers=bearer())
    assert status == 504 and body["type"].endswith("/gateway-timeout")


async def test_upstream_cut_mid_body_aborts_client(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(gateway.url + "/cut", headers=bearer()) as response:
            assert response.status == 200
            await response.read()


async def test_upstream_closing_kept_alive_connections_never_502(
        redis_server: RedisProcess, sqlite_url: str, session: aiohttp.ClientSession) -> None:
    # An upstream that closes idle connections after 50 ms: the pooled connection is stale
    # by the time the next request comes, and must be replaced, not reported as a failure.
    # (PUT: idempotent, so sent again when it met a close in flight; a POST never is.)
    upstream = await Upstream(upstream_app(), keepalive_timeout=0.05).start()
    worker = Worker(settings_for(upstream.url, redis_server.url, sqlite_url))
    await worker.start()
    try:
        statuses = []
        for i in range(12):
            async with session.put(f"http://127.0.0.1:{worker.proxy_port}/api/x", headers=bearer(),
                                   data=b"p" * (i * 100)) as response:
                statuses.append(response.status)
            await asyncio.sleep(0.1 if i % 2 else 0.045)
        assert statuses == [200] * 12
    finally:
        await worker.stop()
        await upstream.close()


async def test_admin_api_not_on_proxy_listener(gateway: RunningGateway, session: aiohttp.ClientSession) -> None:
    for path in ("/metrics", "/healthz", "/readyz", "/admin/tenants"):
        async with session.get(gateway.url + path) as response:
            assert response.status == 401, path  # proxied (and so authenticated), never answered by admin


async def test_absolute_form_target(gateway: RunningGateway) -> None:
    token = bearer()["Authorization"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.worker.proxy_port)
    writer.write(f"GET http://elsewhere.example/api/abs?q=1 HTTP/1.1\r\nHost: elsewhere.example\r\n"
                 f"Authorization: {token}\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["raw_path"] == "/api/abs?q=1"
