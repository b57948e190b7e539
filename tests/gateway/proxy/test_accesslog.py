"""The access log's lines: what json.dumps makes of the record, byte for byte, written in batches."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random

import pytest

from gateway.proxy import accesslog
from gateway.proxy.accesslog import AccessLog


def _reference(ts: float, request_id: str, tenant: str | None, method: str, path: str, route: str, status: int,
               duration: float, upstream_duration: float | None, remote: str | None, bytes_out: int | None,
               error: str | None) -> str:
    """The line as the access log wrote it before lines were batched: a dict through JSONEncoder."""
    query = path.find("?")
    if query >= 0:
        path = path[:query]
    record: dict[str, object] = {
        "ts": round(ts, 3), "request_id": request_id, "tenant": tenant, "method": method, "path": path[:256],
        "route": route, "status": status, "duration_ms": round(duration * 1000, 2),
        "upstream_ms": None if upstream_duration is None else round(upstream_duration * 1000, 2),
        "remote": remote,
    }
    if bytes_out is not None:
        record["bytes_out"] = bytes_out
    if error:
        record["error"] = error
    return json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode(record) + "\n"


def _records(count: int) -> list[tuple]:
    rng = random.Random(12)
    texts = ["/api/chains", "/api/x?access_token=secret", 'quo"te\\back', "ünï\u2028\x00\x1f", "\udcff", "",
             "/" + "a" * 300, "/p?", "?only-query"]
    floats = [0.0, -0.0, 0.0004, 0.0005, 0.0015, 0.001, 0.0099999, 1.0, 10.0, 100.5, 1e-7, 5e11, 2e12, 1e300,
              -0.003, math.inf, -math.inf, math.nan]
    records = []
    for i in range(count):
        ts = rng.choice([rng.uniform(1.7e9, 1.9e9), 1796648085.0, 1796648085.1005, rng.choice(floats)])
        duration = rng.choice([rng.expovariate(50), rng.randint(0, 10**6) / 1000, rng.choice(floats)])
        upstream = rng.choice([None, rng.expovariate(80), rng.randint(0, 10**5) / 1000, rng.choice(floats)])
        records.append((
            ts, f"req-{i}", rng.choice([None, "acme", "tenant-0001"]), rng.choice(["GET", "POST"]),
            rng.choice(texts) if i % 3 else f"/api/chains/c-{i}", rng.choice(["api_calls", "public", "gateway"]),
            rng.choice([200, 204, 401, 429, 502]), duration, upstream, rng.choice([None, "127.0.0.1", "::1"]),
            rng.choice([None, None, 0, 12345]), rng.choice([None, None, "", "upstream-mid-body", 'odd"one']),
        ))
    return records


def test_lines_are_byte_for_byte_what_json_dumps_makes() -> None:
    for record in _records(5000):
        assert accesslog._line(*record) == _reference(*record), record


def test_rounding_matches_round_and_repr_on_many_values() -> None:
    rng = random.Random(7)
    for _ in range(100_000):
        for value in (rng.uniform(1.6e9, 2.0e9), rng.expovariate(0.01), rng.randint(0, 10**8) / 1000,
                      rng.uniform(0, 1e12)):
            assert accesslog._decimal(value, "%.3f", 3) == repr(round(value, 3))
            assert accesslog._decimal(value, "%.2f", 2) == repr(round(value, 2))


def test_write_outside_a_loop_writes_and_flushes_at_once() -> None:
    stream = io.StringIO()
    log = AccessLog(stream)
    log.write(request_id="r1", tenant="acme", method="GET", path="/api/x?token=secret", route="api_calls",
              status=200, duration=0.0123, upstream_duration=0.01, remote="127.0.0.1")
    line = json.loads(stream.getvalue())
    assert line["path"] == "/api/x" and line["duration_ms"] == 12.3 and "token" not in stream.getvalue()


async def test_lines_wait_for_a_batch_or_the_flush_and_keep_their_order() -> None:
    stream = io.StringIO()
    log = AccessLog(stream, flush_interval=0.05)
    records = _records(accesslog.BATCH + 10)
    for record in records:
        log.record(*record[1:])
    # A full batch is formatted and written at once; the rest waits for the flush.
    assert stream.getvalue().count("\n") == accesslog.BATCH
    for _ in range(100):
        await asyncio.sleep(0.05)
        if stream.getvalue().count("\n") == len(records):
            break
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [record[1] for record in records]


def test_disabled_writes_nothing_and_flush_writes_what_is_pending() -> None:
    stream = io.StringIO()
    AccessLog(stream, enabled=False).write(request_id="r", tenant=None, method="GET", path="/", route="public",
                                           status=200, duration=0.0, upstream_duration=None, remote=None)
    assert stream.getvalue() == ""
    log = AccessLog(stream)
    log._flush_handle = object()  # type: ignore[assignment]  # as when a flush is due: nothing written yet
    log.record("r2", None, "GET", "/", "public", 200, 0.0, None, None)
    assert stream.getvalue() == ""
    log.flush()
    assert json.loads(stream.getvalue())["request_id"] == "r2"


@pytest.mark.parametrize("failure", [OSError("gone"), ValueError("I/O operation on closed file")])
def test_a_closed_stream_never_breaks_serving(failure: Exception) -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise failure

        def flush(self) -> None:
            raise failure

    log = AccessLog(Broken())
    log.record("r", None, "GET", "/", "public", 200, 0.0, None, None)  # no loop: formatted, written, flushed
