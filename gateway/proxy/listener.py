"""The proxy listener's sockets and HTTP server: port sharing, connection limits, framing errors.

Requests the HTTP parser refuses (ambiguous framing, bad header bytes, oversized heads) never reach
the handler; `ProblemServer` answers them with problem+json like every other gateway error, closes
the connection, and logs one line without a traceback (they are the client's fault, not ours). That
line never holds bytes of the request (an oversized header may be a token): names, sizes and the
parser's reason only. Requests that are not HTTP/1.0 or 1.1 (a request line without a version, which
llhttp reads as HTTP/0.9, or `HTTP/2.0` on an HTTP/1 connection) are refused the same way.

On SIGTERM the listening socket closes first (a balancer sees connects refused and /readyz gone), then
`ProblemServer` drains: a request that still comes on a kept-alive connection is served and answered with
`Connection: close`, and idle connections are closed only after `IDLE_DRAIN_SECONDS`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import InvalidHeader, InvalidURLError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from gateway.config.settings import HostPort
from gateway.errors import (
    PROBLEM_JSON,
    GatewayError,
    GatewayTimeout,
    InvalidRequest,
    Overloaded,
    problem_body,
    problem_response,
)
from gateway.proxy.headers import request_id
from gateway.proxy.response import serialize

log = logging.getLogger("cosmos_gateway.listener")
# How long a draining listener keeps an idle kept-alive connection open. Closing it at once (aiohttp's
# way) races with a client that sends on it before the close reaches it: that request meets a closed
# socket, gets no answer, and the client cannot know it was never served, so it may not send it again (a
# POST never). A balancer that sends meanwhile has not yet seen the gateway leave; this gives it the time.
IDLE_DRAIN_SECONDS = 1.0
_DRAIN_POLL_SECONDS = 0.02

def overloaded_answer(type_base: str) -> bytes:
    """What a connection beyond `listen.max_connections` is answered before it is closed."""
    error = Overloaded()
    headers = [("Content-Type", PROBLEM_JSON), *error.headers.items()]
    return serialize((1, 1), error.status, "Service Unavailable", headers, problem_body(error, type_base),
                     keep_alive=False)


class _Overloaded(asyncio.Protocol):
    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._answer)
        transport.close()


class LimitedSockSite(web.SockSite):
    """A SockSite that refuses connections beyond `max_connections` instead of queueing them."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, *, max_connections: int, type_base: str,
                 backlog: int = 1024) -> None:
        super().__init__(runner, sock, backlog=backlog)
        self._max_connections = max_connections
        self._overloaded = overloaded_answer(type_base)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner, so cleanup() stops it
        server = self._runner.server
        assert server is not None
        limit, overloaded = self._max_connections, self._overloaded

        def factory() -> asyncio.Protocol:
            if len(server.connections) >= limit:
                return _Overloaded(overloaded)
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            factory, sock=self._sock, backlog=self._backlog)


def bind(address: HostPort, *, reuse_port: bool) -> socket.socket:
    """A listening socket; with reuse_port several worker processes share the port."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address.host, address.port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class VersionNotSupported(GatewayError):
    """505: a request line naming an HTTP major version other than 1 (RFC 9110 §15.6.6)."""

    status, suffix, title = 505, "http-version-not-supported", "HTTP version not supported"


class InternalError(GatewayError):
    """500: a bug of ours; the traceback goes to the log, never to the client."""


# The smallest head a field over the parser's limit can arrive in (`listen.max_header_size` ≥ 1024):
# shorter chunks cannot hold the start of one, so they are not searched for its name.
_MIN_FIELD_LIMIT = 1024
_NAME_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_QUOTED = re.compile(r"""b?'[^']*'?|b?"[^"]*"?""")
_HEADER_NAME = re.compile(r"""['"][!#$%&*+.^_`|~0-9A-Za-z-]{1,64}['"]""")


def _field_too_long(data: bytes, exc: LineTooLong) -> str:
    """Which part of the head is over the limit, by name and size, read from the chunk that held it."""
    limit = exc.args[1] if len(exc.args) > 1 else "the limit"
    line = exc.args[0] if exc.args else b""
    prefix = bytes(line).removesuffix(b"...") if isinstance(line, bytes | bytearray) else b""
    at = data.find(prefix) if prefix else -1
    if at < 0:
        return f"a header or the request line is over {limit} bytes"
    line_start = data.rfind(b"\n", 0, at) + 1
    line_end = data.find(b"\r\n", at)
    size = f"{line_end - line_start} bytes" if line_end >= 0 else f"over {limit} bytes"
    before = data[line_start:at]
    if b":" in before:
        name = before.split(b":", 1)[0].strip()
        shown = name.decode("ascii") if _NAME_RE.fullmatch(name) else "a"
        return f"the {shown} header is {size} (limit {limit})"
    if before:
        return f"the request line is {size} (limit {limit})"
    return f"a header name is {size} (limit {limit})"


def _reason(exc: BaseException | None, message: str | None) -> str:
    """The parser's reason for a refusal, without any of the request's bytes."""
    if isinstance(exc, InvalidHeader):
        return "a header value holds a forbidden byte"
    text = message or ""
    if "\n\n" in text:  # llhttp's form: reason lines, a blank line, then the offending bytes
        text = text.split("\n\n", 1)[0]
    elif isinstance(exc, InvalidURLError):  # the message is the whole target
        return "invalid request target"
    text = " ".join(line.strip() for line in text.splitlines())
    for quoted in _QUOTED.finditer(text):  # only a quoted header name may stay ("Duplicate 'Host' header")
        if not (_HEADER_NAME.fullmatch(quoted.group()) and text.startswith(" header", quoted.end())):
            text = text[:quoted.start()]
            break
    return text.strip().rstrip(":").strip()[:200] or "malformed request"


class _ProblemRequestHandler(RequestHandler):
    type_base = ""
    _too_long: str | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A field over the limit: note which one while the chunk that held it is at hand (its error
        # carries the value's first bytes only, and those must never be logged).
        if len(data) > _MIN_FIELD_LIMIT and self._messages:
            message = self._messages[-1][0]
            if not isinstance(message, RawRequestMessage) and isinstance(getattr(message, "exc", None), LineTooLong):
                self._too_long = _field_too_long(data, message.exc)  # type: ignore[union-attr]

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send the error")
        error: GatewayError
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            error = GatewayTimeout("the request took too long") if status == 504 else InternalError("internal error")
        else:
            if isinstance(exc, LineTooLong):
                detail = self._too_long or _field_too_long(b"", exc)
            else:
                detail = _reason(exc, message)
            log.info("refused a malformed request from %s: %s", request.remote, detail)
            error = InvalidRequest(f"malformed HTTP request: {detail}")
        response = problem_response(error, self.type_base, request_id(()))
        response.force_close()
        return response


class _ClosingProblem:
    """A problem+json answer in HTTP/1.1, whatever version the request line claimed; the connection is
    closed after it. (aiohttp would answer in the request's own version: `HTTP/0.9 400`.)"""

    __slots__ = ("_body_size", "_data", "status")
    keep_alive = False

    def __init__(self, error: GatewayError, type_base: str) -> None:
        self.status = error.status
        body = json.dumps(error.body(type_base), separators=(",", ":")).encode()
        headers = [("Content-Type", PROBLEM_JSON), ("X-Request-Id", request_id(()))]
        self._data = serialize(HttpVersion11, error.status, HTTPStatus(error.status).phrase, headers, body,
                               keep_alive=False)
        self._body_size = len(body)

    async def prepare(self, request: web.BaseRequest) -> None:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client has gone away")
        # The answer to HEAD has the head only (Content-Length as for GET: RFC 9110 §9.3.2).
        transport.write(self._data[:-self._body_size] if request.method == "HEAD" else self._data)
        request.protocol.force_close()  # flushes what was written, then closes; no lingering on a body

    async def write_eof(self, data: bytes = b"") -> None:
        return None


_HTTP_1 = (HttpVersion11, HttpVersion10)
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _http1_only(handler: Handler, type_base: str) -> Handler:
    """The handler, behind a check of the request's HTTP version (no extra frame on the hot path)."""

    async def refuse(request: web.BaseRequest) -> web.StreamResponse:
        major, minor = request.version
        error: GatewayError
        if major >= 2:
            error = VersionNotSupported(f"HTTP/{major}.{minor} is not served here; use HTTP/1.1")
        else:  # llhttp reads a request line without a version (CR or LF in the target) as HTTP/0.9
            error = InvalidRequest("the request line has no valid HTTP version")
        log.info("refused a request from %s: HTTP/%d.%d", request.remote, major, minor)
        return _ClosingProblem(error, type_base)  # type: ignore[return-value]

    def checked(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        if request.version in _HTTP_1:
            return handler(request)
        return refuse(request)

    return checked


class ProblemServer(web.Server):
    """aiohttp's low-level server, answering HTTP parse errors and non-HTTP/1 requests with problem+json,
    and draining kept-alive connections without closing one under a request (see IDLE_DRAIN_SECONDS)."""

    def __init__(self, handler: Handler, *, type_base: str, **kwargs: Any) -> None:
        super().__init__(_http1_only(handler, type_base), **kwargs)
        self._type_base = type_base
        self._draining = False

    def __call__(self) -> RequestHandler:
        handler = _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.type_base = self._type_base
        return handler

    def _make_request(self, message: RawRequestMessage, payload: StreamReader, protocol: RequestHandler,
                      writer: AbstractStreamWriter, task: asyncio.Task[None]) -> web.BaseRequest:
        if self._draining and not message.should_close:
            # Served, and the last on its connection: the answer says `Connection: close` (the client
            # takes the connection out of its pool), and aiohttp closes the connection after it.
            message = message._replace(should_close=True)
        return super()._make_request(message, payload, protocol, writer, task)

    def pre_shutdown(self) -> None:
        """Called once the listening socket is closed. aiohttp closes idle connections here, and a request
        already on its way over one is lost; instead, from now on every request is the last on its
        connection, and idle ones are closed in `shutdown`, after the drain time."""
        self._draining = True

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 -- aiohttp's signature
        """Wait until every connection has closed after its last answer, or IDLE_DRAIN_SECONDS (within the
        grace `timeout`); then aiohttp's shutdown: the rest of the grace for requests in flight, then the
        connections closed."""
        self._draining = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        drain = IDLE_DRAIN_SECONDS if timeout is None else min(IDLE_DRAIN_SECONDS, timeout)
        # Polled: aiohttp forgets a connection in a done callback of its task, with nothing to wait on.
        while self._connections and loop.time() - started < drain:  # noqa: ASYNC110
            await asyncio.sleep(_DRAIN_POLL_SECONDS)
        for connection in self.connections:
            connection.close()  # aiohttp's pre_shutdown: idle ones go now, busy ones after their answer
        left = None if timeout is None else max(0.0, timeout - (loop.time() - started))
        await super().shutdown(left)
