"""The proxy listener's sockets and HTTP server: port sharing, connection limits, framing errors.

Requests the HTTP parser refuses (ambiguous framing, bad header bytes, oversized heads) never reach
the handler; `ProblemServer` answers them with problem+json like every other gateway error, closes
the connection, and logs one line without a traceback (they are the client's fault, not ours).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.config import HostPort
from gateway.errors import InvalidRequest, problem_response

log = logging.getLogger("cosmos_gateway.listener")

# A busy connection is dropped with this when a worker is at `listen.max_connections`.
_OVERLOADED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
               b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")


class _Overloaded(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_OVERLOADED)
        transport.close()


class LimitedSockSite(web.SockSite):
    """A SockSite that refuses connections beyond `max_connections` instead of queueing them."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, *, max_connections: int,
                 backlog: int = 1024) -> None:
        super().__init__(runner, sock, backlog=backlog)
        self._max_connections = max_connections

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner, so cleanup() stops it
        server = self._runner.server
        assert server is not None
        limit = self._max_connections

        def factory() -> asyncio.Protocol:
            if len(server.connections) >= limit:
                return _Overloaded()
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


class _ProblemRequestHandler(RequestHandler):
    type_base = ""

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send the error")
        detail = (message or "malformed request").strip().splitlines()[0][:200]
        log.info("refused a malformed request from %s: %s", request.remote, detail)
        response = problem_response(InvalidRequest(f"malformed HTTP request: {detail}"), self.type_base)
        response.force_close()
        return response


class ProblemServer(web.Server):
    """aiohttp's low-level server, answering HTTP parse errors with problem+json."""

    def __init__(self, handler: Any, *, type_base: str, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._type_base = type_base

    def __call__(self) -> RequestHandler:
        handler = _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.type_base = self._type_base
        return handler
