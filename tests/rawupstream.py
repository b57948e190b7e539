"""A raw upstream for exact bytes on the wire: `asyncio.start_server` runs a handler per accepted
connection, which reads requests and writes whatever bytes the test chooses (well-formed or not)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes  # exactly the bytes read for this request: head and framed body

    def values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name.lower()]


@dataclass
class Conn:
    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[Request] = field(default_factory=list)

    async def read_request(self) -> Request:
        """One request, framed by Content-Length or chunked encoding; IncompleteReadError at EOF."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        raw = bytearray(head)
        body = bytearray()
        names = {name: value for name, value in headers}
        if names.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                raw += size_line
                size = int(size_line.split(b";")[0], 16)
                data = await self.reader.readexactly(size + 2)
                raw += data
                if size == 0:
                    break
                body += data[:-2]
        elif b"content-length" in names:
            data = await self.reader.readexactly(int(names[b"content-length"]))
            raw += data
            body += data
        request = Request(lines[0], headers, bytes(body), bytes(raw))
        self.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_closed_by_peer(self) -> bytes:
        """Whatever the client still sends, up to its close."""
        with contextlib.suppress(ConnectionError):
            return await self.reader.read()
        return b""



Handler = Callable[[Conn], Awaitable[None]]


class RawServer:
    """Runs `handler` for each accepted connection, counting them (total and simultaneous)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conns: list[Conn] = []
        self.active = 0
        self.max_active = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def accepted(self) -> int:
        return len(self.conns)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            self.active -= 1
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()


def reply(body: bytes = b"ok", status: str = "200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (status.encode(), len(body), extra, body)


async def keep_alive(conn: Conn) -> None:
    """Answers every request on the connection with its index and the request count so far."""
    while True:
        await conn.read_request()
        await conn.send(reply(b"%d/%d" % (conn.index, len(conn.requests))))
