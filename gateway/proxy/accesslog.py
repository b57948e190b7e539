"""JSON-lines access log: one line per proxied request, nothing secret in it.

Only chosen fields are written (never headers, never the query string, which may carry
credentials), so the Authorization header and tokens cannot leak. Lines are buffered and
flushed at most every `flush_interval` seconds, so logging costs no syscall per request.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import IO

_PATH_MAX = 256


class AccessLog:
    def __init__(self, stream: IO[str] | None = None, *, enabled: bool = True,
                 flush_interval: float = 1.0) -> None:
        self._stream = stream or sys.stdout
        self.enabled = enabled
        self._flush_interval = flush_interval
        self._flush_handle: asyncio.TimerHandle | None = None
        self._dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode

    def write(self, *, request_id: str, tenant: str | None, method: str, path: str, route: str,
              status: int, duration: float, upstream_duration: float | None, remote: str | None,
              bytes_out: int | None = None, error: str | None = None) -> None:
        if not self.enabled:
            return
        query = path.find("?")
        if query >= 0:
            path = path[:query]
        record = {
            "ts": round(time.time(), 3),
            "request_id": request_id,
            "tenant": tenant,
            "method": method,
            "path": path[:_PATH_MAX],
            "route": route,
            "status": status,
            "duration_ms": round(duration * 1000, 2),
            "upstream_ms": None if upstream_duration is None else round(upstream_duration * 1000, 2),
            "remote": remote,
        }
        if bytes_out is not None:
            record["bytes_out"] = bytes_out
        if error:
            record["error"] = error
        self._stream.write(self._dumps(record) + "\n")
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_handle = loop.call_later(self._flush_interval, self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed: logging must never break serving
