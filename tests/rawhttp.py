"""Raw HTTP/1.1 on blocking sockets, an event loop in a thread, and an upstream on it that records what
it received.

For bytes a client library would normalise away (odd header spellings, broken request lines,
broken framing), sent to a gateway child process (`tests.support.GatewayProcess`). Every read has
a deadline; nothing here loops without a bound.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")

# Set on every answer of the recording upstream: an answer without it is the gateway's own.
UPSTREAM_MARK = "x-upstream-echo"
MAX_RESPONSE = 4 * 1024 * 1024


@dataclass
class RawResponse:
    status: int
    version: bytes
    headers: list[tuple[str, str]]  # names lower-cased, in order
    body: bytes
    informational: list[int] = field(default_factory=list)  # 1xx answers before this one

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def from_upstream(self) -> bool:
        return self.header(UPSTREAM_MARK) == "1"

    @property
    def is_problem(self) -> bool:
        return (self.header("content-type") or "").startswith("application/problem+json")


@dataclass
class Exchange:
    """What came back for one request: the first answer (if any) and whether the peer then closed."""

    response: RawResponse | None
    closed: bool
    raw: bytes


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""
        self.eof = False
        self.raw = b""

    def more(self) -> bool:
        """Read once more; False at EOF, on a reset, or when the deadline has passed."""
        if self.eof:
            return False
        remaining = self.deadline - time.monotonic()
        if remaining <= 0 or len(self.raw) > MAX_RESPONSE:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ConnectionError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        self.raw += data
        return True

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self.buf:
            if not self.more():
                return None
        head, _, self.buf = self.buf.partition(marker)
        return head

    def exactly(self, size: int) -> bytes | None:
        while len(self.buf) < size:
            if not self.more():
                return None
        data, self.buf = self.buf[:size], self.buf[size:]
        return data


def _parse_head(head: bytes) -> tuple[bytes, int, list[tuple[str, str]]]:
    lines = head.split(b"\r\n")
    version, status = lines[0].split(b" ", 2)[:2]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.decode("latin-1").strip().lower(), value.decode("latin-1").strip()))
    return version, int(status), headers


def _read_body(reader: _Reader, status: int, headers: list[tuple[str, str]], head_request: bool) -> bytes | None:
    if head_request or status in (204, 304):
        return b""
    values = dict(headers)
    if "chunked" in values.get("transfer-encoding", ""):
        body = b""
        for _ in range(100_000):
            size_line = reader.until(b"\r\n")
            if size_line is None:
                return None
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                for _ in range(100):  # trailer lines, up to the empty one
                    line = reader.until(b"\r\n")
                    if not line:
                        return body if line is not None else None
                return None
            chunk = reader.exactly(size + 2)
            if chunk is None:
                return None
            body += chunk[:-2]
        return None
    if "content-length" in values:
        return reader.exactly(int(values["content-length"]))
    while reader.more():
        pass
    return reader.buf


def exchange(port: int, raw: bytes, *, timeout: float = 5.0, head_request: bool = False,
             wait_close: float = 0.0) -> Exchange:
    """Send `raw`, read the first final answer; with `wait_close`, wait that long to see the peer close."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
        except ConnectionError:
            pass  # the gateway may answer and close before taking everything
        reader = _Reader(sock, deadline)
        informational: list[int] = []
        response = None
        for _ in range(10):
            head = reader.until(b"\r\n\r\n")
            if head is None:
                break
            version, status, headers = _parse_head(head)
            if 100 <= status < 200:
                informational.append(status)
                continue
            body = _read_body(reader, status, headers, head_request)
            if body is not None:
                response = RawResponse(status, version, headers, body, informational)
            break
        closed = reader.eof
        if response is not None and wait_close and not closed:
            reader.deadline = time.monotonic() + wait_close
            while reader.more():  # bytes after the answer (a second answer) end up in reader.raw
                pass
            closed = reader.eof
        return Exchange(response, closed, reader.raw)


# --------------------------------------------------------------------------- recording upstream


class LoopThread:
    """An event loop of its own in a daemon thread: what runs on it outlives each test's loop, so a
    module-scoped gateway process can use a server started there."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs `coroutine` on the thread's loop and waits (10 s at most) for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@dataclass
class Received:
    method: str
    raw_path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


class RecordingUpstream:
    """An upstream on its own loop in a thread (so a module-scoped gateway process can use it):
    every route answers 200 with JSON and records the request, raw headers included."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._loop = LoopThread()
        self._runner: web.ServerRunner | None = None
        self.url = ""

    async def _record(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        with self._lock:
            self.received.append(Received(request.method, request.raw_path, list(request.raw_headers), body))
        return web.Response(body=json.dumps({"body_size": len(body)}).encode(), content_type="application/json",
                            headers={UPSTREAM_MARK: "1"})

    async def _start(self) -> str:
        # aiohttp's low-level server: no router, so every method and target reaches `_record`; no
        # auto_decompress, so the body recorded is the bytes on the wire, as the gateway must forward them.
        self._runner = web.ServerRunner(web.Server(self._record, auto_decompress=False),
                                        access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def start(self) -> str:
        self.url = self._loop.run(self._start())
        return self.url

    def take(self) -> list[Received]:
        """What was received since the last call."""
        with self._lock:
            received, self.received = self.received, []
        return received

    def close(self) -> None:
        if self._runner is not None:
            self._loop.run(self._runner.cleanup())
        self._loop.close()
