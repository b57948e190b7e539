"""A lean HTTP/1.1 keep-alive connection pool to the one upstream: the proxy's hot path.

Built on `asyncio.Protocol` and httptools (`gateway.proxy.upstream_protocol`) rather than aiohttp's
client, which costs several times more per request. The request head is written in one call;
bodies stream both ways with flow control, so memory does not grow with their size.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import AsyncIterable, Sequence
from urllib.parse import urlsplit

from gateway.proxy.upstream_protocol import (
    UpstreamConnectError,
    UpstreamConnection,
    UpstreamError,
    UpstreamPoolBusy,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
)

__all__ = [
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamPoolBusy",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeout",
]

# Methods that define a body: without one they still say so, as clients do (RFC 9110 §8.6).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Methods whose request may be sent twice with the effect of once (RFC 9110 §9.2.2): only these are
# sent again after they reached a connection that then failed. A POST is never sent twice.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Requests waiting for a connection beyond this many are refused at once (as Envoy's max_pending_requests).
MAX_WAITERS = 1024
_NO_BODY = "\r\n"
_EMPTY_BODY = "Content-Length: 0\r\n\r\n"
_CHUNKED = "Transfer-Encoding: chunked\r\n\r\n"


class UpstreamPool:
    """Keep-alive connections to one `http://host[:port]` upstream, at most `max_connections` open.

    A request that finds them all busy waits (FIFO) at most `pool_timeout` seconds for one, and
    at most `max_waiters` requests wait: beyond either, `UpstreamPoolBusy`.
    """

    def __init__(self, url: str, *, connect_timeout: float, read_timeout: float, max_connections: int,
                 pool_timeout: float | None = None, max_waiters: int = MAX_WAITERS) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected an http://host[:port] upstream URL, got {url!r}")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._authority = parts.netloc.rpartition("@")[2]
        self._host_line = f"Host: {self._authority}\r\n"
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max = max_connections
        self._pool_timeout = pool_timeout
        self._max_waiters = max_waiters
        self._open = 0  # connections open, being opened, or whose slot is being handed over
        self._idle: list[UpstreamConnection] = []  # LIFO: the warmest connection goes first
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._closed = False

    @property
    def stats(self) -> dict[str, int]:
        return {"open": self._open, "idle": len(self._idle), "waiting": len(self._waiters)}

    async def request(self, method: str, target: str, headers: Sequence[tuple[str, str]],
                      body: bytes | bytearray | AsyncIterable[bytes] | None = None, *,
                      content_length: int | None = None) -> UpstreamResponse:
        """Send a request and return the response once its head arrived.

        `target` goes on the request line verbatim; `headers` are sent as given (plus `Host` when
        missing) and must not include framing: the pool adds Content-Length or chunked encoding.
        A streamed `body` with `content_length` must yield exactly that many bytes.
        """
        stream: AsyncIterable[bytes] | None = None
        if body is None:
            framing = _EMPTY_BODY if method in _BODY_METHODS else _NO_BODY
        elif isinstance(body, bytes | bytearray):
            framing = f"Content-Length: {len(body)}\r\n\r\n"
        else:
            stream = body
            framing = _CHUNKED if content_length is None else f"Content-Length: {content_length}\r\n\r\n"
        data = self._head(method, target, headers, framing)
        if isinstance(body, bytes | bytearray) and body:  # at hand whole: sent with the head
            data += body
        is_head = method == "HEAD"
        replayable = stream is None and method in _IDEMPOTENT
        may_retry = True
        while True:
            conn = await self._checkout(probe=not replayable)
            try:
                return await conn.exchange(data, stream, content_length, is_head)
            except UpstreamProtocolError:
                self._discard(conn)
                # A kept-alive connection the upstream closed meanwhile (its idle timeout) and that
                # did not answer: the request goes once more on a fresh one if it never left, or if
                # its method is idempotent and its body is at hand (the upstream may have acted on it).
                if not (may_retry and conn.reused and not conn.got_bytes
                        and (not conn.written or replayable)):
                    raise
                may_retry = False
            except BaseException:
                self._discard(conn)
                raise

    async def close(self) -> None:
        """Close idle connections and refuse new requests; responses in use close on release."""
        self._closed = True
        for conn in self._idle:
            conn.pooled = False
            conn.close()
        self._open -= len(self._idle)
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError("the upstream pool is closed"))
        await asyncio.sleep(0)  # let the transports finish closing before the loop may stop

    def _head(self, method: str, target: str, headers: Sequence[tuple[str, str]], framing: str) -> bytes:
        # Which headers reach this point is decided earlier: the map in gateway/proxy/headers.py.
        text = f"{method} {target} HTTP/1.1\r\n"
        if headers:
            text += "\r\n".join(map(": ".join, headers)) + "\r\n"
        # Each line ends in the one CRLF put there above: any other CR or LF would split a line.
        lines = len(headers) + 1
        if text.count("\n") != lines or text.count("\r") != lines or "\0" in text:
            raise ValueError("CR, LF or NUL in the request line or a header")
        if "\nhost:" not in text.lower():
            text += self._host_line
        return (text + framing).encode("latin-1")

    # ------------------------------------------------------------------------------- the slots

    async def _checkout(self, probe: bool) -> UpstreamConnection:
        """A connection for one exchange; with `probe`, an idle one only after asking the kernel whether
        the upstream has closed it (a request that cannot be sent again would be lost on it)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.pooled = False
            if not conn.broken and not conn.transport.is_closing() and (not probe or conn.quiet()):
                conn.reused = True
                return conn
            self._discard(conn)
        if self._closed:
            raise UpstreamConnectError("the upstream pool is closed")
        if self._waiters or self._open >= self._max:
            if len(self._waiters) >= self._max_waiters:
                raise UpstreamPoolBusy(f"{self._max_waiters} requests are waiting for an upstream connection")
            handed = await self._wait_turn()
            if handed is not None:
                if not handed.broken and not handed.transport.is_closing():
                    handed.reused = True
                    return handed
                handed.close()  # its slot is ours now: connect anew on it
        else:
            self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._free_slot()
            raise

    async def _wait_turn(self) -> UpstreamConnection | None:
        """Queue (FIFO) for a connection or, when None comes, for a slot to connect on."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        timer = None if self._pool_timeout is None else loop.call_at(
            loop.time() + self._pool_timeout, self._expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed over, but cancelled before resuming
                handed = waiter.result()
                if handed is None:
                    self._free_slot()
                else:
                    self._put(handed)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, waiter: asyncio.Future[UpstreamConnection | None]) -> None:
        if not waiter.done():
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            waiter.set_exception(UpstreamPoolBusy(f"no upstream connection was free within {self._pool_timeout} s"))

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        factory = functools.partial(UpstreamConnection, loop, self._read_timeout, self._release, self._lost)
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(factory, self._host, self._port)
        except TimeoutError as exc:  # before OSError: it is one
            raise UpstreamConnectError(f"connecting to {self._authority} timed out") from exc
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {self._authority}: {exc}") from exc
        return conn

    def _put(self, conn: UpstreamConnection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.pooled = True
        self._idle.append(conn)

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter
                return
        self._open -= 1

    def _discard(self, conn: UpstreamConnection) -> None:
        conn.close()
        self._free_slot()

    def _release(self, conn: UpstreamConnection, reusable: bool) -> None:
        if reusable and not self._closed:
            self._put(conn)
        else:
            self._discard(conn)

    def _lost(self, conn: UpstreamConnection) -> None:
        if conn.pooled:  # an idle connection the upstream closed: drop it now, not at checkout
            conn.pooled = False
            self._idle.remove(conn)
            self._free_slot()
