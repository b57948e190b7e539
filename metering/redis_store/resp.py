"""A lean pipelined RESP connection for the hot path against a single Redis node.

redis-py's pipeline spends most of its time packing and parsing in Python; this connection packs
with `hiredis.pack_command` and parses with `hiredis.Reader`, both in C, and keeps one TCP
connection on which batches are pipelined back to back (Redis answers in order). It only carries the
store's script calls; everything else, and Redis Cluster, goes through redis-py. Replies that are
errors come back as `hiredis.ReplyError` values, like `raise_on_error=False` in redis-py.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis.asyncio import Redis

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # a pure-Python install (the default): the decorator only tells mypyc something
    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[type], type]:  # type: ignore[misc]
        return lambda cls: cls


@mypyc_attr(native_class=False)  # mypyc compiles subclasses of BaseException and Exception only, not of OSError
class RespError(ConnectionError):
    """The connection failed or was closed; the batch's outcome is unknown."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[tuple[asyncio.Future[list[Any]], list[Any], int]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        while waiting:
            reply = self.reader.gets()
            if reply is False:
                return
            future, replies, expected = waiting[0]
            replies.append(reply)
            if len(replies) == expected:
                waiting.popleft()
                if not future.done():
                    future.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiting:
            future, _, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(RespError(f"connection to Redis lost: {exc or 'closed'}"))


class RespConnection:
    """One pipelined connection; `execute()` sends a batch of commands and returns their replies."""

    def __init__(self, host: str, port: int, *, db: int = 0, username: str | None = None,
                 password: str | None = None, connect_timeout: float = 0.5) -> None:
        self._host, self._port, self._db = host, port, db
        self._username, self._password = username, password
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    @classmethod
    def for_client(cls, client: Any) -> RespConnection | None:
        """A connection to the same server as a redis-py client, or None where only redis-py fits (TLS, unix)."""
        if not isinstance(client, Redis):
            return None
        kwargs = client.connection_pool.connection_kwargs
        plain_tcp = client.connection_pool.connection_class.__name__ == "Connection"
        if "host" not in kwargs or kwargs.get("ssl") or not plain_tcp:
            return None
        return cls(kwargs["host"], int(kwargs.get("port", 6379)), db=int(kwargs.get("db", 0) or 0),
                   username=kwargs.get("username"), password=kwargs.get("password"))

    async def execute(self, commands: Sequence[bytes | Sequence[Any]]) -> list[Any]:
        """Send the commands (argument sequences, or bytes already in RESP) and return their replies."""
        return await self.send(commands, await self.connect())

    def ready(self) -> _Protocol | None:
        """The open connection, if there is one: callers then send without awaiting anything."""
        protocol = self._protocol
        if protocol is None or protocol.closed or protocol.transport is None or protocol.transport.is_closing():
            return None
        return protocol

    def send(self, commands: Sequence[bytes | Sequence[Any]], protocol: _Protocol) -> asyncio.Future[list[Any]]:
        """Write the commands now; the future holds their replies. Once written, they may run even if the
        caller stops waiting: the future still resolves when the replies come (or fails if the connection
        is lost), which is how a caller that timed out learns what happened."""
        assert protocol.transport is not None
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        protocol.waiting.append((future, [], len(commands)))
        protocol.transport.write(b"".join([c if isinstance(c, bytes) else hiredis.pack_command(tuple(c))
                                           for c in commands]))
        return future

    def give_up(self, future: asyncio.Future[list[Any]]) -> None:
        """Replies still missing after the grace: the server is gone or stuck. Close, failing what waits."""
        if not future.done() and self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()

    async def connect(self) -> _Protocol:
        """The open connection, connecting (and AUTH, SELECT) first if there is none."""
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.closed:
                return self._protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    _, protocol = await loop.create_connection(_Protocol, self._host, self._port)
                    setup = []
                    if self._password:
                        setup.append(("AUTH", *(() if self._username is None else (self._username,)),
                                      self._password))
                    if self._db:
                        setup.append(("SELECT", self._db))
                    if setup:
                        self._protocol = protocol
                        replies = await self.execute(setup)
                        errors = [r for r in replies if isinstance(r, hiredis.ReplyError)]
                        if errors:
                            protocol.transport.close()  # type: ignore[union-attr]
                            raise RespError(f"Redis refused the connection set-up: {errors[0]}")
            except OSError as exc:
                raise RespError(f"cannot connect to Redis at {self._host}:{self._port}: {exc}") from exc
            self._protocol = protocol
            return protocol

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
