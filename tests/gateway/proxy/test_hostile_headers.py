"""Header spellings, request lines and log hygiene on a real `cosmos-gateway serve` (PRODUCT.md §3).

The upstream behind a gateway is often a WSGI app: WSGI and CGI servers turn `-` and `_` alike into
`HTTP_X_COSMOS_TENANT`, so a client-sent `X_Cosmos_Tenant` would be the identity the app reads.
Bytes go out on raw sockets; the upstream records the raw headers it received.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator

import pytest

from gateway.cli.devservices import RedisProcess
from tests.rawhttp import Exchange, Received, RecordingUpstream, exchange
from tests.support import GatewayProcess, bearer, running_gateway

TOKEN = bearer("acme", sub="user-1")["Authorization"]
IDENTITY = {"x-cosmos-tenant": "acme", "x-cosmos-plan": "starter", "x-cosmos-subject": "user-1"}

# Each spelling a WSGI/CGI server reads like an identity, forwarding, hop-by-hop or framing header.
SPOOFED = [
    b"X_Cosmos_Tenant: evil", b"x_cosmos_plan: enterprise", b"X-Cosmos_Subject: admin", b"X_COSMOS_TENANT: evil2",
    b"X-Cosmos-Tenant: evil3", b"x_cosmos_usage: chains=0",
    b"X_Forwarded_For: 6.6.6.6", b"X_Forwarded_Host: evil.example", b"X_Forwarded_Proto: https",
    b"x-forwarded_for: 7.7.7.7", b"X-Forwarded-For: 8.8.8.8",
    b"X_Request_Id: spoofed-id", b"Content_Length: 999", b"Transfer_Encoding: chunked",
    b"Keep_Alive: timeout=99", b"Proxy_Authorization: Basic eA==", b"Proxy_Connection: keep-alive",
    b"Connection: x_private, X-Other_Secret", b"X-Private: 1", b"X_Private: 2", b"x_other_secret: 3",
    b"X-Other-Secret: 4",
]
DROPPED_NAMES = {"x-cosmos-usage", "x-private", "x-other-secret", "content-length", "transfer-encoding",
                 "keep-alive", "proxy-authorization", "proxy-connection", "connection"}


@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream()
    upstream.start()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def gateway_process(redis_process: RedisProcess, recorder: RecordingUpstream,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with running_gateway(recorder.url, redis_process.url, tmp_path_factory.mktemp("hostile-headers"),
                         listen={"header_timeout": 2}) as process:
        yield process


@pytest.fixture
def gateway(gateway_process: GatewayProcess, recorder: RecordingUpstream) -> GatewayProcess:
    recorder.take()
    return gateway_process


def normalized(name: bytes) -> str:
    return name.decode("latin-1").lower().replace("_", "-")


def get(path: str, *lines: bytes) -> bytes:
    return b"\r\n".join([f"GET {path} HTTP/1.1".encode(), b"Host: gw.test", b"Connection: close", *lines]) + (
        b"\r\n\r\n")


def forwarded_once(request: Received) -> None:
    """Only the gateway's own forwarding values, each once, with the gateway's own spelling."""
    by_name: dict[str, list[tuple[bytes, bytes]]] = {}
    for name, value in request.headers:
        by_name.setdefault(normalized(name), []).append((name, value))
    assert by_name["x-forwarded-for"] == [(b"X-Forwarded-For", b"127.0.0.1")]
    assert by_name["x-forwarded-proto"] == [(b"X-Forwarded-Proto", b"http")]
    assert by_name["x-forwarded-host"] == [(b"X-Forwarded-Host", b"gw.test")]
    assert by_name["forwarded"] == [(b"Forwarded", b"for=127.0.0.1;proto=http;host=gw.test")]
    assert [name for name, _ in by_name["x-request-id"]] == [b"X-Request-Id"]
    assert by_name["x-request-id"][0][1] != b"spoofed-id"
    for gone in DROPPED_NAMES:
        assert gone not in by_name, (gone, by_name.get(gone))


@pytest.mark.parametrize("path", ["/status/x", "/health"])
def test_underscore_spellings_never_reach_the_upstream_on_a_public_path(gateway: GatewayProcess,
                                                                        recorder: RecordingUpstream,
                                                                        path: str) -> None:
    result = exchange(gateway.proxy_port, get(path, *SPOOFED))
    assert result.response is not None and result.response.status == 200, result.raw[:300]
    [request] = recorder.take()
    forwarded_once(request)
    # A public path carries no identity at all: the upstream must not see one from the client.
    assert [n for n, _ in request.headers if normalized(n).startswith("x-cosmos-")] == []


def test_underscore_spellings_never_reach_the_upstream_on_an_authenticated_path(gateway: GatewayProcess,
                                                                                recorder: RecordingUpstream) -> None:
    result = exchange(gateway.proxy_port, get("/api/x", f"Authorization: {TOKEN}".encode(), *SPOOFED))
    assert result.response is not None and result.response.status == 200, result.raw[:300]
    [request] = recorder.take()
    forwarded_once(request)
    identity = [(n.decode(), v.decode()) for n, v in request.headers if normalized(n).startswith("x-cosmos-")]
    assert sorted(identity) == sorted([("X-Cosmos-Tenant", "acme"), ("X-Cosmos-Plan", "starter"),
                                       ("X-Cosmos-Subject", "user-1")])


def test_ordinary_underscore_headers_still_pass(gateway: GatewayProcess, recorder: RecordingUpstream) -> None:
    result = exchange(gateway.proxy_port, get("/status/x", b"X_Custom_Thing: kept", b"my_header: also"))
    assert result.response is not None and result.response.status == 200
    [request] = recorder.take()
    assert (b"X_Custom_Thing", b"kept") in request.headers and (b"my_header", b"also") in request.headers


# ------------------------------------------------------------------ request line


def refused(result: Exchange, status: int = 400) -> dict[str, object]:
    assert result.response is not None, result.raw[:300]
    response = result.response
    assert response.status == status, result.raw[:300]
    assert response.is_problem, response.headers
    assert response.version in (b"HTTP/1.0", b"HTTP/1.1")
    assert response.header("x-request-id")
    assert result.closed, "the connection must be closed after the refusal"
    assert len(re.findall(rb"HTTP/1\.[01] \d{3} ", result.raw)) == 1, result.raw  # one answer, then closed
    document = json.loads(response.body)
    assert document["status"] == status
    return document


REQUEST_LINES = {
    # CRLF inside the target: without a version the rest would be read as headers (HTTP/0.9 style).
    "crlf-injection-public": b"GET /status/x\r\nX-Injected: 1 HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "crlf-injection-api": (b"GET /api/x\r\nAuthorization: " + TOKEN.encode() + b"\r\nX-Injected: 1 HTTP/1.1\r\n"
                           b"Host: gw.test\r\n\r\n"),
    "lf-injection": b"GET /status/x\nX-Injected: 1 HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "no-version": b"GET /status/x\r\nHost: gw.test\r\n\r\n",
    "http-0.9-explicit": b"GET /status/x HTTP/0.9\r\nHost: gw.test\r\n\r\n",
    "http-1.2": b"GET /status/x HTTP/1.2\r\nHost: gw.test\r\n\r\n",
    "http-1.10": b"GET /status/x HTTP/1.10\r\nHost: gw.test\r\n\r\n",
    "lower-case-version": b"GET /status/x http/1.1\r\nHost: gw.test\r\n\r\n",
    "nul-in-target": b"GET /status/a\x00b HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "cr-in-target": b"GET /status/a\rb HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    "tab-in-target": b"GET /status/a\tb HTTP/1.1\r\nHost: gw.test\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(REQUEST_LINES))
def test_bad_request_line_is_one_400_and_closed(gateway: GatewayProcess, recorder: RecordingUpstream,
                                                 name: str) -> None:
    result = exchange(gateway.proxy_port, REQUEST_LINES[name], wait_close=2)
    document = refused(result)
    assert str(document["type"]).endswith("/invalid-request")
    assert recorder.take() == []


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0"])
def test_unsupported_major_version_is_505(gateway: GatewayProcess, recorder: RecordingUpstream,
                                         version: bytes) -> None:
    raw = b"GET /status/x " + version + b"\r\nHost: gw.test\r\n\r\n"
    result = exchange(gateway.proxy_port, raw, wait_close=2)
    if version == b"HTTP/3.0":  # llhttp refuses it in the parser already: 400
        refused(result, 400)
    else:
        document = refused(result, 505)
        assert str(document["type"]).endswith("/http-version-not-supported")
    assert recorder.take() == []


def test_refusal_of_a_head_request_has_no_body(gateway: GatewayProcess) -> None:
    raw = b"HEAD /status/x HTTP/2.0\r\nHost: gw.test\r\n\r\n"
    result = exchange(gateway.proxy_port, raw, head_request=True, wait_close=2)
    assert result.response is not None and result.response.status == 505
    assert result.closed and result.raw.endswith(b"\r\n\r\n"), result.raw  # the head only, then closed
    assert int(result.response.header("content-length") or 0) > 0


def test_http_1_0_and_1_1_still_served(gateway: GatewayProcess, recorder: RecordingUpstream) -> None:
    for version in (b"HTTP/1.0", b"HTTP/1.1"):
        result = exchange(gateway.proxy_port, b"GET /status/x " + version + b"\r\nHost: gw.test\r\n"
                          b"Connection: close\r\n\r\n")
        assert result.response is not None and result.response.status == 200, result.raw[:200]
    assert len(recorder.take()) == 2


# ------------------------------------------------------------------ log hygiene


@pytest.mark.parametrize("size", [9000, 20_000])
def test_oversized_header_is_logged_by_name_and_size_only(gateway: GatewayProcess, recorder: RecordingUpstream,
                                                          size: int) -> None:
    secret = b"SECRETTOKEN" + b"s" * size
    result = exchange(gateway.proxy_port, get("/api/x", b"Authorization: Bearer " + secret), wait_close=2)
    assert result.response is not None and result.response.status in (400, 431)
    assert result.response.is_problem
    assert b"SECRETTOKEN" not in result.raw  # not echoed to the client either
    log = gateway.log()
    assert "SECRETTOKEN" not in log and "Bearer" not in log
    assert "authorization" in log.lower()
    assert recorder.take() == []


def test_oversized_target_is_logged_without_its_bytes(gateway: GatewayProcess, recorder: RecordingUpstream) -> None:
    result = exchange(gateway.proxy_port, get("/api/x?access_token=SECRETQUERY" + "q" * 20_000), wait_close=2)
    assert result.response is not None and result.response.status in (400, 414)
    assert b"SECRETQUERY" not in result.raw
    assert "SECRETQUERY" not in gateway.log()
    assert recorder.take() == []


def test_oversized_header_sent_in_pieces_is_logged_without_its_bytes(gateway: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=5) as sock:
        sock.sendall(b"GET /api/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer SECRETPIECE" + b"p" * 5000)
        time.sleep(0.2)  # the gateway has read the first piece: the error comes with the second one
        sock.sendall(b"p" * 10_000 + b"\r\n\r\n")
        sock.settimeout(5)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.0 400") and b"application/problem+json" in answer
    assert b"SECRETPIECE" not in answer
    log = gateway.log()
    assert "SECRETPIECE" not in log and "over 8190 bytes" in log


def test_bad_header_bytes_are_logged_without_the_value(gateway: GatewayProcess, recorder: RecordingUpstream) -> None:
    result = exchange(gateway.proxy_port, get("/api/x", b"Authorization: Bearer SECRETCTL\x01xyz"), wait_close=2)
    assert result.response is not None and result.response.status == 400 and result.response.is_problem
    assert b"SECRETCTL" not in result.raw
    assert "SECRETCTL" not in gateway.log()


@pytest.mark.parametrize("message", [
    "Bad status line 'GET /x?token=SECRET1 HTTP/1.1'",  # the pure-Python parser's forms
    "Invalid HTTP header: b'Bearer SECRET1\\x00'",
    "Got more than 8190 bytes when reading: b'Bearer SECRET1...'.",
    "Invalid header value char:\n\n  b'Authorization: Bearer SECRET1\\x01'\n                ^",  # llhttp's form
    "Bad status line:\n  Invalid HTTP version:\n\n  b'GET /SECRET1 HTTP/1.2'\n  ^",
])
def test_refusal_reasons_keep_no_request_bytes(message: str) -> None:
    from gateway.proxy.listener import _reason

    reason = _reason(None, message)
    assert "SECRET1" not in reason and reason
