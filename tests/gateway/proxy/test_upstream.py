"""`gateway.proxy.upstream.UpstreamPool` against real servers on 127.0.0.1: aiohttp for well-behaved
exchanges, raw `asyncio.start_server` handlers where the bytes on the wire must be exact."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.proxy.upstream import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamPoolBusy,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.proxy.upstream_protocol import BUFFER_HIGH
from tests.rawupstream import Conn, Handler, RawServer, keep_alive, reply

pytestmark = pytest.mark.timeout(10)

BIG_PIECE = 64 * 1024
BIG_PIECES = 320  # 20 MiB


# ------------------------------------------------------------------------------ raw servers


StartServer = Callable[[Handler], Awaitable[RawServer]]
MakePool = Callable[..., UpstreamPool]


async def until(predicate: Callable[[], object], limit: float = 1.0) -> None:
    """Polls a condition only the code under test can change (it has no event to wait on)."""
    async with asyncio.timeout(limit):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.002)


@pytest.fixture
async def raw_server() -> AsyncIterator[StartServer]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = await RawServer(handler).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_pool() -> AsyncIterator[MakePool]:
    pools: list[UpstreamPool] = []

    def make(url: str, *, connect_timeout: float = 1.0, read_timeout: float = 2.0, max_connections: int = 4,
             **options: Any) -> UpstreamPool:
        pool = UpstreamPool(url, connect_timeout=connect_timeout, read_timeout=read_timeout,
                            max_connections=max_connections, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


async def body_of(response: UpstreamResponse) -> bytes:
    try:
        return await response.read()
    finally:
        response.release()


# ------------------------------------------------------------------------------ aiohttp upstream


def aiohttp_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return web.json_response({
            "method": request.method,
            "path": request.raw_path,
            "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            "body": body.decode("latin-1"),
            "peer_port": peer[1] if peer else None,
        })

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        piece = b"x" * BIG_PIECE
        for _ in range(BIG_PIECES):
            await response.write(piece)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/big", big)
    return app


@pytest.fixture
async def app_url() -> AsyncIterator[str]:
    runner = web.AppRunner(aiohttp_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def header_values(echoed: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echoed["headers"] if k.lower() == name.lower()]


# ------------------------------------------------------------------------------ round trips


async def test_get_round_trip(app_url: str, make_pool: MakePool) -> None:
    pool = make_pool(app_url)
    response = await pool.request("GET", "/echo?a=1&b=%20", [("X-Test", "yes")])
    assert (response.status, response.reason) == (200, "OK")
    assert response.keep_alive and not response.chunked
    body = await body_of(response)
    assert response.content_length == len(body)
    echoed = json.loads(body)
    assert echoed["method"] == "GET" and echoed["path"] == "/echo?a=1&b=%20"
    assert header_values(echoed, "X-Test") == ["yes"]
    assert header_values(echoed, "Host") == [app_url.removeprefix("http://")]
    assert header_values(echoed, "Content-Length") == header_values(echoed, "Transfer-Encoding") == []


async def test_post_round_trip_and_caller_host_is_kept(app_url: str,
                                                         make_pool: MakePool) -> None:
    pool = make_pool(app_url)
    payload = bytes(range(256)) * 40
    headers = [("Host", "api.example"), ("Content-Type", "x/y")]
    response = await pool.request("POST", "/echo", headers, payload)
    echoed = json.loads(await body_of(response))
    assert response.status == 200
    assert echoed["method"] == "POST" and echoed["body"].encode("latin-1") == payload
    assert header_values(echoed, "Host") == ["api.example"]
    assert header_values(echoed, "Content-Length") == [str(len(payload))]


async def test_head_has_no_body_and_the_connection_stays_usable(
        app_url: str, make_pool: MakePool) -> None:
    pool = make_pool(app_url, max_connections=1)
    get = await pool.request("GET", "/echo", [])
    get_body = await body_of(get)
    head = await pool.request("HEAD", "/echo", [])
    assert head.status == 200 and head.content_length is not None and head.content_length > 0
    assert await asyncio.wait_for(head.read(), 1) == b""
    head.release()
    again = await pool.request("GET", "/echo", [])
    again_body = await body_of(again)
    assert json.loads(again_body)["peer_port"] == json.loads(get_body)["peer_port"]  # one connection
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}


@pytest.mark.parametrize(("method", "status"), [("HEAD", "200 OK"), ("GET", "204 No Content"),
                                                ("GET", "304 Not Modified"), ("HEAD", "404 Not Found")])
async def test_no_body_responses_ignore_content_length(
        raw_server: StartServer, make_pool: MakePool,
        method: str, status: str) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 %s\r\nContent-Length: 5\r\nETag: \"v1\"\r\n\r\n" % status.encode())
        await keep_alive(conn)  # the next request on the same connection

    server = await raw_server(handler)
    pool = make_pool(server.url, read_timeout=0.5)
    response = await pool.request(method, "/x", [])
    assert response.status == int(status[:3]) and response.content_length == 5
    assert ("ETag", '"v1"') in response.headers
    assert await asyncio.wait_for(response.read(), 1) == b""
    response.release()
    assert await body_of(await pool.request("GET", "/y", [])) == b"0/2"
    assert server.accepted == 1


async def test_interim_responses_are_skipped(raw_server: StartServer,
                                             make_pool: MakePool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await conn.send(reply(b"final", "201 Created", b"X-Final: 1\r\n"))
        await keep_alive(conn)

    server = await raw_server(handler)
    pool = make_pool(server.url)
    response = await pool.request("POST", "/x", [("Expect", "100-continue")], b"data")
    assert (response.status, response.reason) == (201, "Created")
    assert response.headers == [("Content-Length", "5"), ("X-Final", "1")]
    assert response.keep_alive
    assert await body_of(response) == b"final"
    assert await body_of(await pool.request("GET", "/y", [])) == b"0/2"
    assert server.accepted == 1


async def test_one_connection_parses_every_kind_of_response_in_turn(raw_server: StartServer,
                                                                     make_pool: MakePool) -> None:
    """The connection keeps its parser from one response to the next: each kind still reads right."""
    answers = [
        reply(b"first"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nX-N: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",  # to a HEAD
        b"HTTP/1.1 100 Continue\r\n\r\n" + reply(b"after-interim", "201 Created"),
        reply(b"", "200 OK"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        reply(b"last"),
    ]

    async def handler(conn: Conn) -> None:
        for answer in answers:
            await conn.read_request()
            await conn.send(answer)
        await conn.wait_closed_by_peer()

    server = await raw_server(handler)
    pool = make_pool(server.url, max_connections=1)
    got = []
    for method in ("GET", "GET", "GET", "HEAD", "POST", "GET", "GET", "GET"):
        response = await pool.request(method, "/x", [], b"data" if method == "POST" else None)
        got.append((response.status, await body_of(response)))
    assert got == [(200, b"first"), (200, b"abcde"), (204, b""), (200, b""), (201, b"after-interim"),
                   (200, b""), (200, b""), (200, b"last")]
    assert server.accepted == 1


async def test_read_timeout_counts_from_each_request_on_a_kept_alive_connection(
        raw_server: StartServer, make_pool: MakePool) -> None:
    """One timer per connection watches the response heads: it fires for the request in flight, and
    a deadline left by an earlier request never cuts a later one short."""
    read_timeout = 2.0
    release_second = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(reply(b"one"))
        await conn.read_request()
        await release_second.wait()  # answered after the first request's deadline, before its own
        await conn.send(reply(b"two"))
        await conn.read_request()  # never answered
        await conn.wait_closed_by_peer()

    server = await raw_server(handler)
    pool = make_pool(server.url, read_timeout=read_timeout, max_connections=1)
    assert await body_of(await pool.request("GET", "/1", [])) == b"one"
    await asyncio.sleep(read_timeout * 0.6)
    loop = asyncio.get_running_loop()
    loop.call_later(read_timeout * 0.6, release_second.set)
    assert await body_of(await pool.request("GET", "/2", [])) == b"two"
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/3", [])
    assert server.accepted == 1 and pool.stats["open"] == 0


async def test_101_is_a_protocol_error(raw_server: StartServer,
                                       make_pool: MakePool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\n\r\n")
        await conn.wait_closed_by_peer()

    server = await raw_server(handler)
    with pytest.raises(UpstreamProtocolError):
        await make_pool(server.url).request("GET", "/ws", [])


# ------------------------------------------------------------------------------ request framing


async def agen(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


@pytest.mark.parametrize(
    ("method", "make_body", "content_length", "framing", "wire_body", "body"),
    [
        ("POST", lambda: b"hello", None, (b"5", None), b"hello", b"hello"),
        ("PUT", lambda: bytearray(b"hey"), None, (b"3", None), b"hey", b"hey"),
        ("POST", lambda: b"", None, (b"0", None), b"", b""),
        ("POST", lambda: None, None, (b"0", None), b"", b""),
        ("PATCH", lambda: None, None, (b"0", None), b"", b""),
        ("GET", lambda: None, None, (None, None), b"", b""),
        ("DELETE", lambda: b"x", None, (b"1", None), b"x", b"x"),
        ("POST", lambda: agen(b"", b"abc", b"", b"defgh"), None, (None, b"chunked"),
         b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n", b"abcdefgh"),
        ("POST", lambda: agen(), None, (None, b"chunked"), b"0\r\n\r\n", b""),
        ("PUT", lambda: agen(b"abc", b"defgh"), 8, (b"8", None), b"abcdefgh", b"abcdefgh"),
    ],
    ids=["bytes", "bytearray", "empty-bytes", "post-none", "patch-none", "get-none", "delete-bytes",
         "stream-chunked", "stream-empty", "stream-with-length"],
)
async def test_request_framing_on_the_wire(
        raw_server: StartServer, make_pool: MakePool,
        method: str, make_body: Callable[[], Any], content_length: int | None,
        framing: tuple[bytes | None, bytes | None], wire_body: bytes, body: bytes) -> None:
    server = await raw_server(keep_alive)
    pool = make_pool(server.url)
    response = await pool.request(method, "/up?load=1", [("X-A", "1"), ("x-b", "two words")], make_body(),
                                  content_length=content_length)
    assert await body_of(response) == b"0/1"
    [request] = server.conns[0].requests
    assert request.line == b"%s /up?load=1 HTTP/1.1" % method.encode()
    lengths, encodings = request.values(b"content-length"), request.values(b"transfer-encoding")
    assert lengths == ([] if framing[0] is None else [framing[0]])
    assert encodings == ([] if framing[1] is None else [framing[1]])
    assert not (lengths and encodings)
    assert request.values(b"x-a") == [b"1"] and request.values(b"x-b") == [b"two words"]
    assert request.values(b"host") == [f"127.0.0.1:{server.port}".encode()]
    assert request.body == body
    assert request.raw.endswith(b"\r\n\r\n" + wire_body)
    assert request.raw.count(b"\r\n\r\n") == 1 + wire_body.count(b"\r\n\r\n")


async def test_streamed_body_of_the_wrong_length_fails(raw_server: StartServer,
                                                       make_pool: MakePool) -> None:
    server = await raw_server(keep_alive)
    pool = make_pool(server.url)
    with pytest.raises(ValueError, match="longer"):
        await pool.request("POST", "/", [], agen(b"abcdef"), content_length=3)
    with pytest.raises(ValueError, match="shorter"):
        await pool.request("POST", "/", [], agen(b"ab"), content_length=3)
    assert await body_of(await pool.request("POST", "/", [], agen(b"abc"), content_length=3)) == b"2/1"
    assert pool.stats["open"] == 1


@pytest.mark.parametrize("headers", [[("X-Evil", "a\r\nInjected: 1")], [("X\nY", "1")], [("X", "a\0b")]])
async def test_header_injection_is_refused(make_pool: MakePool,
                                           headers: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError):
        await make_pool("http://127.0.0.1:9").request("GET", "/", headers)


# ------------------------------------------------------------------------------ response bodies


async def test_content_length_body(raw_server: StartServer,
                                   make_pool: MakePool) -> None:
    payload = bytes(range(256)) * 100

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(reply(payload)[:-1000])
        await conn.send(payload[-1000:])
        await keep_alive(conn)

    server = await raw_server(handler)
    pool = make_pool(server.url)
    response = await pool.request("GET", "/", [])
    assert response.content_length == len(payload) and not response.chunked and response.keep_alive
    assert await body_of(response) == payload
    assert await body_of(await pool.request("GET", "/", [])) == b"0/2"


async def test_chunked_body(raw_server: StartServer,
                            make_pool: MakePool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await conn.send(b"1;ext=1\r\n \r\nA\r\n0123456789\r\n")
        await conn.send(b"0\r\nX-Trailer: t\r\n\r\n")
        await keep_alive(conn)

    server = await raw_server(handler)
    pool = make_pool(server.url)
    response = await pool.request("GET", "/", [])
    assert response.chunked and response.content_length is None and response.keep_alive
    assert [chunk async for chunk in response] == [b"hello", b" ", b"0123456789"]
    response.release()
    assert await body_of(await pool.request("GET", "/", [])) == b"0/2"
    assert server.accepted == 1


async def test_close_delimited_body(raw_server: StartServer,
                                    make_pool: MakePool) -> None:
    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.read_request()
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
            await conn.send(b"the end")
            return  # closes
        await keep_alive(conn)

    server = await raw_server(handler)
    pool = make_pool(server.url)
    response = await pool.request("GET", "/", [])
    assert response.content_length is None and not response.chunked and not response.keep_alive
    assert await asyncio.wait_for(body_of(response), 1) == b"until the end"
    assert await body_of(await pool.request("GET", "/", [])) == b"1/1"
    assert server.accepted == 2


async def test_large_chunked_body_streams_with_bounded_buffer(
        app_url: str, make_pool: MakePool) -> None:
    pool = make_pool(app_url)
    response = await pool.request("GET", "/big", [])
    assert response.status == 200 and response.chunked
    # Not reading: the pool must stop reading from the socket instead of buffering the body.
    await until(lambda: response._paused, 2)
    limit = BUFFER_HIGH + 512 * 1024
    assert response._buffered <= limit
    total = chunks = peak = 0
    async for chunk in response:
        total += len(chunk)
        chunks += 1
        peak = max(peak, response._buffered + len(chunk))
    response.release()
    assert total == BIG_PIECE * BIG_PIECES
    assert chunks > 1 and peak <= limit
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}


# ------------------------------------------------------------------------------ keep-alive


async def test_sequential_requests_share_one_connection(raw_server: StartServer,
                                                        make_pool: MakePool) -> None:
    server = await raw_server(keep_alive)
    pool = make_pool(server.url)
    assert await body_of(await pool.request("GET", "/a", [])) == b"0/1"
    assert await body_of(await pool.request("POST", "/b", [], b"x")) == b"0/2"
    async with await pool.request("GET", "/c", []) as response:
        assert await response.read() == b"0/3"
    assert server.accepted == 1
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}


async def test_connection_close_response_is_not_reused(raw_server: StartServer,
                                                       make_pool: MakePool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(reply(b"bye", extra=b"Connection: close\r\n"))
        await conn.wait_closed_by_peer()  # leave closing to the client

    server = await raw_server(handler)
    pool = make_pool(server.url)
    first = await pool.request("GET", "/", [])
    assert not first.keep_alive
    assert await body_of(first) == b"bye"
    assert await body_of(await pool.request("GET", "/", [])) == b"bye"
    assert server.accepted == 2


def first_goes_stale(then: Callable[[Conn], Awaitable[object]] | None = None) -> Handler:
    """The first connection answers one request with `first` (kept alive), does `then` and closes; later
    connections keep_alive."""

    async def handler(conn: Conn) -> None:
        if conn.index > 0:
            return await keep_alive(conn)
        await conn.read_request()
        await conn.send(reply(b"first"))
        if then is not None:
            await then(conn)
        # returning closes the kept-alive connection without a Connection: close

    return handler


@pytest.mark.parametrize("when", ["closes-right-after-answer", "closes-on-next-request",
                                  "closed-before-next"])
async def test_stale_pooled_connection_is_retried_once(
        raw_server: StartServer, make_pool: MakePool,
        when: str) -> None:
    # closes-on-next-request: the idle timeout fired just as the request arrived
    server = await raw_server(first_goes_stale(Conn.read_request if when == "closes-on-next-request" else None))
    pool = make_pool(server.url)
    assert await body_of(await pool.request("GET", "/", [])) == b"first"
    if when == "closed-before-next":
        await until(lambda: not pool.stats["idle"])  # the pool notices the close of an idle connection
        assert pool.stats["open"] == 0
    response = await pool.request("PUT", "/again", [("X-Id", "2")], b"payload")  # idempotent: sent again
    assert await body_of(response) == b"1/1"
    assert server.accepted == 2
    [retried] = server.conns[1].requests
    assert retried.body == b"payload" and retried.values(b"x-id") == [b"2"]
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_stale_connection_never_sends_a_non_idempotent_request_twice(
        raw_server: StartServer, make_pool: MakePool, method: str) -> None:
    # It reads the next request (and may have acted on it), then closes without an answer.
    server = await raw_server(first_goes_stale(Conn.read_request))
    pool = make_pool(server.url)
    assert await body_of(await pool.request("GET", "/", [])) == b"first"
    with pytest.raises(UpstreamProtocolError):
        await pool.request(method, "/deploy", [], b"payload")
    assert server.accepted == 1 and len(server.conns[0].requests) == 2
    assert pool.stats["open"] == 0


async def test_a_post_goes_on_a_fresh_connection_when_the_kernel_knows_of_the_close(
        make_pool: MakePool) -> None:
    """The upstream closed an idle connection and the FIN has arrived, but the loop has not run since:
    a POST (which is never sent twice) must not be the request that finds out."""
    listener = socket.create_server(("127.0.0.1", 0))
    closed = threading.Event()
    seen: list[bytes] = []

    def serve() -> None:  # a blocking server in a thread: it runs while the loop is held up below
        with listener:
            for index in range(2):
                conn, _ = listener.accept()
                with conn:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    seen.append(data.split(b"\r\n", 1)[0])
                    conn.sendall(reply(b"%d" % index))
                    if index == 0:
                        conn.shutdown(socket.SHUT_RDWR)
                closed.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    pool = make_pool(f"http://127.0.0.1:{listener.getsockname()[1]}")
    assert await body_of(await pool.request("GET", "/", [])) == b"0"
    assert closed.wait(2)  # blocking on purpose: the loop must not see the close
    time.sleep(0.05)  # noqa: ASYNC251 -- the FIN reaches this side's kernel meanwhile
    assert pool.stats["idle"] == 1  # the pool has not noticed
    assert await body_of(await pool.request("POST", "/deploy", [], b"payload")) == b"1"
    thread.join(2)
    assert seen == [b"GET / HTTP/1.1", b"POST /deploy HTTP/1.1"]


async def test_stale_connection_with_streamed_body_is_not_retried(
        raw_server: StartServer, make_pool: MakePool) -> None:
    async def read_head(conn: Conn) -> bytes:
        return await conn.reader.readuntil(b"\r\n\r\n")  # the head of the next request, then close

    server = await raw_server(first_goes_stale(read_head))
    pool = make_pool(server.url)
    assert await body_of(await pool.request("GET", "/", [])) == b"first"

    async def body() -> AsyncIterator[bytes]:
        yield b"once"
        await asyncio.Event().wait()  # the body cannot be replayed: the request must fail

    with pytest.raises(UpstreamProtocolError):
        await pool.request("POST", "/", [], body())
    assert server.accepted == 1
    assert pool.stats["open"] == 0


async def test_fresh_connection_closed_before_response_is_not_retried(
        raw_server: StartServer, make_pool: MakePool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()  # and close without answering

    server = await raw_server(handler)
    pool = make_pool(server.url)
    with pytest.raises(UpstreamProtocolError):
        await pool.request("POST", "/", [], b"x")
    assert server.accepted == 1
    assert pool.stats == {"open": 0, "idle": 0, "waiting": 0}


# ------------------------------------------------------------------------------ errors


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_connect_refused(make_pool: MakePool) -> None:
    pool = make_pool(f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(UpstreamConnectError):
        await pool.request("GET", "/", [])
    assert pool.stats == {"open": 0, "idle": 0, "waiting": 0}


async def test_no_answer_times_out(raw_server: StartServer,
                                   make_pool: MakePool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.wait_closed_by_peer()

    server = await raw_server(handler)
    pool = make_pool(server.url, read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/", [])
    assert 0.25 <= time.monotonic() - started < 1.0
    assert pool.stats["open"] == 0


async def test_stalled_body_times_out(raw_server: StartServer,
                                      make_pool: MakePool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await conn.wait_closed_by_peer()

    server = await raw_server(handler)
    pool = make_pool(server.url, read_timeout=0.3)
    response = await pool.request("GET", "/", [])
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await response.read()
    assert 0.25 <= time.monotonic() - started < 1.0
    response.release()
    assert pool.stats["open"] == 0


@pytest.mark.parametrize("garbage", [
    b"NOT HTTP AT ALL\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
async def test_garbage_is_a_protocol_error(raw_server: StartServer,
                                           make_pool: MakePool, garbage: bytes) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(garbage)
        await conn.wait_closed_by_peer()  # the error must come from parsing, not from a close

    server = await raw_server(handler)
    pool = make_pool(server.url, read_timeout=1)
    with pytest.raises(UpstreamProtocolError):
        async with asyncio.timeout(0.9):
            response = await pool.request("GET", "/", [])
            try:
                await response.read()
            finally:
                response.release()
    assert pool.stats["open"] == 0


async def test_body_cut_midway(raw_server: StartServer,
                               make_pool: MakePool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"y" * 10)

    server = await raw_server(handler)
    pool = make_pool(server.url)
    response = await pool.request("GET", "/", [])
    assert response.content_length == 1000
    received = b""
    with pytest.raises(UpstreamError):
        async with asyncio.timeout(1):
            async for chunk in response:
                received += chunk
    assert received == b"y" * 10
    response.release()
    assert pool.stats["open"] == 0


async def test_chunked_body_cut_midway(raw_server: StartServer,
                                       make_pool: MakePool) -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\nonly a little")

    server = await raw_server(handler)
    response = await make_pool(server.url).request("GET", "/", [])
    with pytest.raises(UpstreamProtocolError):
        async with asyncio.timeout(1):
            await response.read()
    response.release()


async def test_closed_pool_refuses_requests(raw_server: StartServer,
                                            make_pool: MakePool) -> None:
    server = await raw_server(keep_alive)
    pool = make_pool(server.url)
    assert await body_of(await pool.request("GET", "/", [])) == b"0/1"
    await pool.close()
    assert pool.stats == {"open": 0, "idle": 0, "waiting": 0}
    with pytest.raises(UpstreamConnectError):
        await pool.request("GET", "/", [])


# ------------------------------------------------------------------------------ limits and release


async def test_max_connections_is_respected(raw_server: StartServer,
                                            make_pool: MakePool) -> None:
    in_flight = 0
    peak = 0
    both = asyncio.Event()

    async def handler(conn: Conn) -> None:
        nonlocal in_flight, peak
        while True:
            request = await conn.read_request()
            in_flight += 1
            peak = max(peak, in_flight)
            if in_flight >= 2:
                both.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(both.wait(), 1)  # hold the first until the second arrives
            await asyncio.sleep(0.03)  # a slow upstream
            in_flight -= 1
            await conn.send(reply(request.line.split()[1]))

    server = await raw_server(handler)
    pool = make_pool(server.url, max_connections=2)

    async def one(i: int) -> bytes:
        return await body_of(await pool.request("GET", f"/{i}", []))

    bodies = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(5))), 3)
    assert bodies == [f"/{i}".encode() for i in range(5)]
    assert server.max_active <= 2 and server.accepted == 2
    assert peak == 2
    assert pool.stats == {"open": 2, "idle": 2, "waiting": 0}


def held_until(gate: asyncio.Event) -> Handler:
    """Answers each request with `ok` once `gate` is set; until then the connection is busy."""

    async def handler(conn: Conn) -> None:
        while True:
            await conn.read_request()
            await gate.wait()
            await conn.send(reply())

    return handler


async def test_pool_timeout_and_waiter_bound(raw_server: StartServer, make_pool: MakePool) -> None:
    gate = asyncio.Event()
    server = await raw_server(held_until(gate))
    pool = make_pool(server.url, read_timeout=5, max_connections=1, pool_timeout=0.2, max_waiters=2)
    busy = asyncio.create_task(pool.request("GET", "/", []))
    await until(lambda: server.accepted == 1 and pool.stats["open"] == 1)
    waiters = [asyncio.create_task(pool.request("GET", "/", [])) for _ in range(2)]
    await until(lambda: pool.stats["waiting"] == 2)
    started = time.monotonic()
    with pytest.raises(UpstreamPoolBusy):  # a third waiter is refused at once
        await pool.request("GET", "/", [])
    assert time.monotonic() - started < 0.1
    for waiter in waiters:  # the two waiting ones after pool_timeout
        with pytest.raises(UpstreamPoolBusy):
            await asyncio.wait_for(waiter, 2)
    assert 0.15 <= time.monotonic() - started < 1.5
    assert pool.stats == {"open": 1, "idle": 0, "waiting": 0}
    gate.set()
    assert await body_of(await busy) == b"ok"
    assert await body_of(await pool.request("GET", "/", [])) == b"ok"
    assert server.accepted == 1 and pool.stats == {"open": 1, "idle": 1, "waiting": 0}


async def test_a_waiter_served_in_time_is_not_expired(raw_server: StartServer, make_pool: MakePool) -> None:
    server = await raw_server(keep_alive)
    pool = make_pool(server.url, read_timeout=5, max_connections=1, pool_timeout=0.3)

    async def one() -> bytes:
        return await body_of(await pool.request("GET", "/", []))

    bodies = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(5))), 3)
    assert bodies == [b"0/%d" % i for i in range(1, 6)]
    await asyncio.sleep(0.4)  # the timers of the served waiters must not fire late on anything
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}


async def test_cancelled_waiter_frees_its_turn(raw_server: StartServer,
                                               make_pool: MakePool) -> None:
    gate = asyncio.Event()
    server = await raw_server(held_until(gate))
    pool = make_pool(server.url, max_connections=1)
    first = asyncio.create_task(pool.request("GET", "/", []))
    waiting = asyncio.create_task(pool.request("GET", "/", []))
    await until(lambda: pool.stats["waiting"] == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    gate.set()
    assert await body_of(await first) == b"ok"
    assert await body_of(await pool.request("GET", "/", [])) == b"ok"
    assert server.accepted == 1 and pool.stats == {"open": 1, "idle": 1, "waiting": 0}


async def test_early_release_does_not_pool_a_dirty_connection(
        raw_server: StartServer, make_pool: MakePool) -> None:
    client_closed = asyncio.Event()

    async def handler(conn: Conn) -> None:
        if conn.index > 0:
            return await keep_alive(conn)
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 100)
        await conn.wait_closed_by_peer()
        client_closed.set()

    server = await raw_server(handler)
    pool = make_pool(server.url, max_connections=1)
    response = await pool.request("GET", "/", [])
    first = await response.__anext__()
    assert first == b"z" * 100
    response.release()
    response.release()  # idempotent
    with pytest.raises(UpstreamProtocolError):
        await response.read()
    await asyncio.wait_for(client_closed.wait(), 1)
    assert await body_of(await pool.request("GET", "/", [])) == b"1/1"
    assert server.accepted == 2


async def test_early_release_of_a_large_body_then_reuse(app_url: str,
                                                        make_pool: MakePool) -> None:
    pool = make_pool(app_url, max_connections=1)
    response = await pool.request("GET", "/big", [])
    assert len(await response.__anext__()) > 0
    response.release()
    echoed = json.loads(await asyncio.wait_for(body_of(await pool.request("POST", "/echo", [], b"hi")), 2))
    assert echoed["method"] == "POST" and echoed["body"] == "hi"
    assert pool.stats == {"open": 1, "idle": 1, "waiting": 0}
