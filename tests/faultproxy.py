"""A TCP proxy that injects faults between the gateway and Redis (or any server), for tests.

Bytes pass both ways until a fault is switched on:
- `blackhole`: what clients send is swallowed (never reaches the server) and the connection stays open,
  as a server that stalls before it reads;
- `drop_replies`: what the server sends back is swallowed, as replies lost on the way; a connection that
  lost a reply never forwards one again (TCP loses nothing in the middle of a stream: the rest would be
  read as the answers to other commands), until it is cut;
- `cut()`: every open connection is closed at once.
Each fault applies to the connections open now and to new ones until it is switched off.
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.cli.devservices import free_port


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.blackhole = False
        self.drop_replies = False
        self.forwarded = 0  # bytes that reached the server
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers |= {client_writer, server_writer}
        lost = [False]  # this connection dropped a reply: it stays mute
        upstream = asyncio.ensure_future(self._pipe(client_reader, server_writer, towards_server=True, lost=lost))
        downstream = asyncio.ensure_future(self._pipe(server_reader, client_writer, towards_server=False, lost=lost))
        self._tasks |= {upstream, downstream}
        await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
        for task in (upstream, downstream):
            task.cancel()
        for writer in (client_writer, server_writer):
            writer.close()
            self._writers.discard(writer)
        self._tasks -= {upstream, downstream}

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, towards_server: bool,
                    lost: list[bool]) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if towards_server and self.blackhole:
                    continue
                if not towards_server and (self.drop_replies or lost[0]):
                    lost[0] = True
                    continue
                if towards_server:
                    self.forwarded += len(data)
                writer.write(data)
                await writer.drain()

    def cut(self) -> None:
        """Close every open connection, both sides."""
        for writer in list(self._writers):
            writer.close()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
