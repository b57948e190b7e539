"""The wire side of `gateway.proxy.upstream`: one HTTP/1.1 client connection as an `asyncio.Protocol`.

A connection carries one exchange at a time. The pool writes the request head (with a bytes
body), a sender task streams an iterable body, httptools parses the response, and the body
flows to the reader through a bounded buffer on the `UpstreamResponse`.

Per exchange the connection makes as few objects as it can: one parser serves every response of
a connection (a fresh one only after a HEAD response or an error, which leave it mid-message), and
one timer per connection watches `read_timeout`, moved forward by each request rather than made anew.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections import deque
from collections.abc import AsyncIterable, Callable
from typing import cast

import httptools

# Reading pauses above HIGH unread body bytes and resumes at LOW: memory stays flat for any body.
BUFFER_HIGH = 256 * 1024
BUFFER_LOW = 64 * 1024
# A response head (status line, headers, and any interim responses before it) larger than this,
# or with more header lines, is refused: the upstream is trusted for its answers, not its size.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 256
# The read_timeout timer counts a deadline this close as reached (uvloop's clock ticks in milliseconds).
_TIMER_SLACK = 0.001


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer properly."""


class UpstreamConnectError(UpstreamError):
    """Connecting failed: refused, unreachable or timed out."""


class UpstreamTimeout(UpstreamError):
    """No response head within read_timeout, or the body stalled for longer."""


class UpstreamProtocolError(UpstreamError):
    """A malformed or oversized response, or the connection closed before the response was complete."""


class UpstreamPoolBusy(UpstreamError):
    """No connection was free within pool_timeout, or too many requests were waiting for one."""


def _expire(waiter: asyncio.Future[object], message: str) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(message))


class UpstreamResponse:
    """A response head and its body, to read once (`read()` or `async for`); `release()` after."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_done", "_error", "_paused", "_transport", "_waiter",
                 "chunked", "content_length", "headers", "keep_alive", "reason", "status")

    def __init__(self, conn: UpstreamConnection, status: int, reason: str, headers: list[tuple[str, str]],
                 content_length: int | None, chunked: bool, keep_alive: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        # As in the head, so also for HEAD and 304, where it describes a body that is not sent.
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self._conn: UpstreamConnection | None = conn
        self._transport = conn.transport
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The whole body."""
        if self._done:  # all of it is here already, as for most small responses: no iteration
            chunks = self._chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._buffered = 0
            if self._paused:
                self._resume()
            return data
        parts = [chunk async for chunk in self]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            await self._wait()
        chunk = chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= BUFFER_LOW:
            self._resume()
        return chunk

    def release(self) -> None:
        """Give the connection back: pooled if the exchange completed cleanly, else closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not self._done:
            self._fail(UpstreamProtocolError("the response was released before its end"))
        conn.release(self)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    async def _wait(self) -> None:
        conn = self._conn
        assert conn is not None  # released responses are done or failed, so never wait
        loop = conn.loop
        waiter = self._waiter = loop.create_future()
        timer = loop.call_at(loop.time() + conn.read_timeout, self._stalled)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _stalled(self) -> None:
        self._fail(UpstreamTimeout("the upstream stalled while sending the response body"))

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > BUFFER_HIGH and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        if self._error is None:
            self._done = True
            self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self._done and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume(self) -> None:
        self._paused = False
        if not self._transport.is_closing():
            self._transport.resume_reading()


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection, owned by the pool, which runs one `exchange` on it at a time."""

    transport: asyncio.Transport

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float,
                 on_release: Callable[[UpstreamConnection, bool], None],
                 on_lost: Callable[[UpstreamConnection], None]) -> None:
        self.loop = loop
        self.read_timeout = read_timeout
        self._on_release = on_release
        self._on_lost = on_lost
        self.broken = False  # EOF, lost or out of sync: never to carry another request
        self.pooled = False  # in the pool's idle list
        self.reused = False  # carried a request before, so the upstream may have closed it meanwhile
        self.got_bytes = False  # the current exchange saw a response byte: never retried then
        self.body_started = False  # the current streamed body was iterated: never retried then
        self.written = False  # the current request went (partly, perhaps) to the transport
        self._request_sent = False
        self._is_head = False
        self._parser: httptools.HttpResponseParser | None = None  # set while a response is due
        # The parser between responses: llhttp starts the next message where the last one ended.
        self._spare_parser: httptools.HttpResponseParser | None = None
        self._response: UpstreamResponse | None = None  # set from the final head to the body's end
        self._head: asyncio.Future[UpstreamResponse] | None = None
        # read_timeout for a response head: the deadline of the request in flight, and one timer that
        # is moved on to it when it fires early (cheaper than a timer per request on a busy connection).
        self._head_deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sender: asyncio.Task[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._poll: select.poll | None = None
        self._reason = b""
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0  # of the headers parsed so far in this head
        self._head_fed = 0  # bytes fed while no final head had come (interim responses included)
        self._length: int | None = None
        self._chunked = False

    # ----------------------------------------------------------------------------- the pool's side

    async def exchange(self, data: bytes, body: AsyncIterable[bytes] | None, length: int | None,
                       is_head: bool) -> UpstreamResponse:
        """Send a request (`data`: its head, and its body unless streamed) and await the response head."""
        self.written = False
        if self.broken:
            raise UpstreamProtocolError("the upstream closed the connection before the request")
        self.got_bytes = self.body_started = self._request_sent = False
        self._head_fed = 0
        self._is_head = is_head
        parser, self._spare_parser = self._spare_parser, None
        self._parser = parser if parser is not None else httptools.HttpResponseParser(self)
        head = self._head = self.loop.create_future()
        self.written = True
        self.transport.write(data)
        if body is None:
            self._sent()
        else:
            self._sender = self.loop.create_task(self._send(body, length))
        try:
            return await head
        finally:
            self._head = None
            self._head_deadline = None  # the timer, if any, stays armed for the next request

    def release(self, response: UpstreamResponse) -> None:
        # Reusable only when both messages are complete and nothing stray arrived.
        reusable = (response._done and response.keep_alive and self._request_sent
                    and self._parser is None and not self.broken)
        if reusable and response._paused:
            response._resume()
        self._on_release(self, reusable)

    def close(self) -> None:
        """Close for good: gracefully after a complete exchange, else abort (nothing more to flush)."""
        self.broken = True
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        self._cancel_timer()
        if self._parser is None and self._request_sent:
            self.transport.close()
        else:
            self.transport.abort()

    # ------------------------------------------------------------------------- the request body

    async def _send(self, body: AsyncIterable[bytes], length: int | None) -> None:
        self.body_started = True
        transport = self.transport
        try:
            if length is None:
                async for chunk in body:
                    if chunk:  # an empty chunk would end the chunked body
                        transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                        if self._writing_paused:
                            await self._drained()
                transport.write(b"0\r\n\r\n")
            else:
                remaining = length
                async for chunk in body:
                    remaining -= len(chunk)
                    if remaining < 0:
                        raise ValueError("the request body is longer than its content_length")
                    transport.write(chunk)
                    if self._writing_paused:
                        await self._drained()
                if remaining:
                    raise ValueError("the request body is shorter than its content_length")
        except Exception as exc:
            # The request cannot be completed: the caller gets the cause instead of a response.
            self._sender = None
            self.broken = True
            transport.abort()
            self._fail_head(exc)
            return
        self._sender = None
        self._sent()

    async def _drained(self) -> None:
        waiter = self._drain = self.loop.create_future()
        timer = self.loop.call_at(self.loop.time() + self.read_timeout, _expire, waiter,
                                  "the upstream stopped reading the request body")
        try:
            await waiter
        finally:
            timer.cancel()
            self._drain = None

    def _sent(self) -> None:
        self._request_sent = True
        head = self._head
        if head is not None and not head.done():
            deadline = self._head_deadline = self.loop.time() + self.read_timeout
            if self._timer is None:
                self._timer = self.loop.call_at(deadline, self._head_timer)

    def _head_timer(self) -> None:
        """The read_timeout timer: fails the awaited head at its deadline, or waits on for a later one."""
        self._timer = None
        deadline = self._head_deadline
        head = self._head
        if deadline is None or head is None or head.done():
            return  # no head is awaited: the next request arms the timer again
        if self.loop.time() + _TIMER_SLACK >= deadline:
            self._head_deadline = None
            head.set_exception(UpstreamTimeout("no response head within read_timeout"))
        else:  # set by an earlier request: on to this one's deadline
            self._timer = self.loop.call_at(deadline, self._head_timer)

    # ------------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small requests must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def quiet(self) -> bool:
        """Nothing (no byte, EOF or reset) waits on the socket unread, as on an idle connection that is
        in step with the upstream: asks the kernel, which may know of a close the loop has not seen yet."""
        return self._poll is None or not self._poll.poll(0)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            # Between exchanges the upstream must stay silent: bytes now mean it is out of sync.
            self.broken = True
            self.transport.abort()
            return
        self.got_bytes = True
        in_head = self._response is None
        try:
            parser.feed_data(data)
            if in_head and self._response is None and self._parser is not None:
                # Still no final head: what came so far is all head. httptools keeps a header
                # that has not ended in memory, so the size is bounded here, not only per header.
                self._head_fed += len(data)
                if self._head_fed > MAX_HEAD_BYTES:
                    raise UpstreamProtocolError(f"the response head exceeds {MAX_HEAD_BYTES} bytes")
        except UpstreamProtocolError as exc:
            self.broken = True
            self._fail(exc)
        except httptools.HttpParserError as exc:
            self.broken = True
            self._spare_parser = None  # llhttp stays in its error state
            if self._parser is not None:  # else: stray bytes after a complete response
                cause = exc.__context__
                self._fail(cause if isinstance(cause, UpstreamError)
                           else UpstreamProtocolError(f"malformed response: {exc}"))

    def eof_received(self) -> None:
        self.broken = True  # returning None lets the transport close: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        self._spare_parser = None
        self._cancel_timer()
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        if self._parser is not None:
            response = self._response
            if response is None:
                self._fail_head(UpstreamProtocolError("the upstream closed the connection before the response"))
            elif response.content_length is None and not response.chunked:
                self._complete()  # a close-delimited body ends here
            else:
                response._fail(UpstreamProtocolError("the upstream closed the connection mid-body"))
            self._parser = self._response = None
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ----------------------------------------------------------------------- httptools callbacks

    def on_message_begin(self) -> None:
        if self._parser is None:
            raise UpstreamProtocolError("data after the response")
        self._reason = b""
        self._headers = []
        self._head_size = 0
        self._length = None
        self._chunked = False

    def on_status(self, status: bytes) -> None:
        self._reason += status  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
        size = len(name)  # the length check spares a lower() for most names
        self._head_size += size + len(value) + 4  # ": " and CRLF
        if self._head_size > MAX_HEAD_BYTES or len(headers) > MAX_HEADERS:
            raise UpstreamProtocolError(f"the response head exceeds {MAX_HEAD_BYTES} bytes "
                                        f"or {MAX_HEADERS} headers")
        if size == 14 and name.lower() == b"content-length":
            self._length = int(value)  # llhttp has validated it
        elif size == 17 and name.lower() == b"transfer-encoding":
            self._chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise UpstreamProtocolError("unexpected 101 Switching Protocols")
            return  # interim (100 Continue, 103 Early Hints): the final response follows
        response = self._response = UpstreamResponse(
            self, status, self._reason.decode("latin-1"), self._headers,
            None if self._chunked else self._length, self._chunked, parser.should_keep_alive())
        if self._sender is not None:
            # The upstream answered before the whole body was sent: stop sending (as nginx does);
            # the connection is then not reused.
            self._sender.cancel()
            self._sender = None
        self._head_deadline = None
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)
        if self._is_head:
            self._complete()  # httptools cannot be told about HEAD: whatever the head says, no body

    def on_body(self, body: bytes) -> None:
        if self._response is None:
            self.broken = True  # a body after a HEAD response: out of sync
        else:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._response is not None:  # else an interim response, or HEAD (completed already)
            self._complete()

    # --------------------------------------------------------------------------------- internals

    def _complete(self) -> None:
        response = self._response
        assert response is not None
        if not self._is_head and not self.broken:  # after a HEAD, llhttp would still wait for its body
            self._spare_parser = self._parser
        self._parser = self._response = None
        response._finish()

    def _fail(self, error: UpstreamError) -> None:
        if self._response is not None:
            self._response._fail(error)
        else:
            self._fail_head(error)
        self._parser = self._response = None
        self.broken = True
        self.transport.abort()

    def _fail_head(self, error: BaseException) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
