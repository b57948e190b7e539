"""JSON-lines access log: one line per proxied request, nothing secret in it.

Only chosen fields are written (never headers, never the query string, which may carry
credentials), so the Authorization header and tokens cannot leak. A request only appends its
fields to a list; the lines are formatted together, a batch at a time (every `BATCH` requests, and
at each flush), and written in one call. They are flushed at most every `flush_interval` seconds,
so logging costs no syscall per request. Each line is what `json.dumps(record, separators=(",", ":"))`
makes of the record, byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from json.encoder import encode_basestring_ascii as _string
from typing import IO

_PATH_MAX = 256
# Requests whose lines are formatted and written together: a short pause for the event loop, and about
# what the stream's own buffer held before it was written (so a crash loses no more lines than it did).
BATCH = 64
_LINE = ('{"ts":%s,"request_id":%s,"tenant":%s,"method":%s,"path":%s,"route":%s,"status":%d,'
         '"duration_ms":%s,"upstream_ms":%s,"remote":%s')

# One request's fields, as `AccessLog.record` takes them (`ts` first).
_Record = tuple[float, str, str | None, str, str, str, int, float, float | None, str | None, int | None, str | None]


class AccessLog:
    def __init__(self, stream: IO[str] | None = None, *, enabled: bool = True,
                 flush_interval: float = 1.0) -> None:
        self._stream = stream or sys.stdout
        self.enabled = enabled
        self._flush_interval = flush_interval
        self._flush_handle: asyncio.TimerHandle | None = None
        self._pending: list[_Record] = []

    def write(self, *, request_id: str, tenant: str | None, method: str, path: str, route: str,
              status: int, duration: float, upstream_duration: float | None, remote: str | None,
              bytes_out: int | None = None, error: str | None = None) -> None:
        if self.enabled:
            self.record(request_id, tenant, method, path, route, status, duration, upstream_duration, remote,
                        bytes_out, error)

    def record(self, request_id: str, tenant: str | None, method: str, path: str, route: str, status: int,
               duration: float, upstream_duration: float | None, remote: str | None,
               bytes_out: int | None = None, error: str | None = None) -> None:
        """`write` with its fields in order (the per-request call): the line is formatted later."""
        pending = self._pending
        pending.append((time.time(), request_id, tenant, method, path, route, status, duration,
                        upstream_duration, remote, bytes_out, error))
        if len(pending) >= BATCH:
            self._write_pending()
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_handle = loop.call_later(self._flush_interval, self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        self._write_pending()
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed: logging must never break serving

    def _write_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        text = "".join([_line(*record) for record in pending])
        try:
            self._stream.write(text)
        except (OSError, ValueError):
            pass  # as in flush()


def _line(ts: float, request_id: str, tenant: str | None, method: str, path: str, route: str, status: int,
          duration: float, upstream_duration: float | None, remote: str | None, bytes_out: int | None,
          error: str | None) -> str:
    query = path.find("?")
    if query >= 0:
        path = path[:query]
    line = _LINE % (
        _decimal(ts, "%.3f", 3), _string(request_id), "null" if tenant is None else _string(tenant),
        _string(method), _string(path[:_PATH_MAX]), _string(route), status,
        _decimal(duration * 1000, "%.2f", 2),
        "null" if upstream_duration is None else _decimal(upstream_duration * 1000, "%.2f", 2),
        "null" if remote is None else _string(remote),
    )
    if bytes_out is not None:
        line += f',"bytes_out":{bytes_out:d}'
    if error:
        line += ',"error":' + _string(error)
    return line + "}\n"


def _decimal(value: float, spec: str, digits: int) -> str:
    """What json.dumps writes for round(value, digits), about three times faster.

    Below 1e12 (15 significant digits at most) a float's repr is the shortest decimal that reads back
    to it, which for a value rounded to `digits` places is that rounding without its trailing zeros:
    the digits `spec` ("%.<digits>f") makes, by the same correct rounding that round() uses."""
    if 0 <= value < 1e12:
        text = (spec % value).rstrip("0")
        return text + "0" if text[-1] == "." else text
    return json.dumps(round(value, digits))  # NaN, infinities, the huge and the negative: as ever
