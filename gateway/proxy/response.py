"""A small response written to the client in one call, without aiohttp's per-response machinery.

Most proxied responses are small and complete once the upstream has answered. aiohttp would build
a header multidict, run its prepare steps (compression, chunking, cookies, signals), serialize the
head and then write head and body through its stream writer: a sizeable share of the gateway's CPU
per request (see docs/benchmarks.md). `SmallResponse` serializes status line, headers and body into
one buffer and writes it to the transport directly, applying the same framing rules aiohttp applies
to such a response: Content-Length from the body, a default Content-Type, Date when the upstream did
not send one, and Connection for keep-alive across HTTP/1.0 and 1.1.

aiohttp's request handler only calls `prepare()`, `write_eof()` and reads `keep_alive` on what a
handler returns; that is the whole protocol this class implements.

Where else a response's headers are touched: the map in gateway/proxy/headers.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from email.utils import formatdate

from aiohttp import web

_date_second = -1
_date_value = ""


def http_date() -> str:
    """The IMF-fixdate of now, formatted once per second."""
    global _date_second, _date_value
    second = int(time.time())
    if second != _date_second:
        _date_second, _date_value = second, formatdate(second, usegmt=True)
    return _date_value


class UnsafeHeader(ValueError):
    """A header name or value would break the framing (CR or LF in it)."""


class SmallResponse:
    """A complete response of known, small size; `status` is what access logs and metrics read."""

    __slots__ = ("_data", "keep_alive", "status")

    def __init__(self, request: web.BaseRequest, status: int, reason: str, headers: Sequence[tuple[str, str]],
                 body: bytes, head_lines: str = "") -> None:
        self.status = status
        self.keep_alive = request.keep_alive
        self._data = serialize(request.version, status, reason, headers, body, self.keep_alive, head_lines)

    async def prepare(self, request: web.BaseRequest) -> None:
        """Write the whole response (aiohttp calls this once the handler has returned it)."""
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client has gone away")
        transport.write(self._data)
        # A client that pipelines requests but does not read: stop here until its buffer drains.
        if transport.get_write_buffer_size() > 65536:
            await request.writer.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def serialize(version: tuple[int, int], status: int, reason: str, headers: Sequence[tuple[str, str]],
               body: bytes, keep_alive: bool, head_lines: str = "") -> bytes:
    """The response in HTTP/1.x; `head_lines` are header lines of the gateway's own, formatted already
    ("Name: value\r\n" each, with nothing from the upstream in them): added as they are."""
    lines = [f"HTTP/{version[0]}.{version[1]} {status} {reason}\r\n"]
    has_date = has_type = False
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n")
        if len(name) in (4, 12):
            lower = name.lower()
            has_date = has_date or lower == "date"
            has_type = has_type or lower == "content-type"
    head = "".join(lines)
    # One CR and one LF per line, or a name, value or reason smuggled in a line break.
    if head.count("\n") != len(lines) or head.count("\r") != len(lines):
        raise UnsafeHeader("a response header or the reason phrase contains CR or LF")
    extra = f"{head_lines}Content-Length: {len(body)}\r\n"
    if body and not has_type:
        extra += "Content-Type: application/octet-stream\r\n"  # as aiohttp: RFC 9110 §8.3
    if not has_date:
        extra += f"Date: {http_date()}\r\n"
    if not keep_alive and version >= (1, 1):
        extra += "Connection: close\r\n"
    elif keep_alive and version < (1, 1):
        extra += "Connection: keep-alive\r\n"
    return (head + extra + "\r\n").encode("latin-1") + body
