"""Fail-open spool: usage counted while Redis was unavailable, kept on local disk until replayed.

One JSON object per line, each a `Record` with a unique id:

    {"id": "<uuid4 hex>", "tenant": "acme", "period_start": 1719792000, "period_end": 1722470400,
     "bucket_start": 1719800100, "bucket_ttl": 691200, "refund": [], "add": [["bandwidth_bytes", 512]],
     "gauges": [], "count": [["api_calls", 1]], "bill": [["api_calls", 1]]}

An admitted check is spooled as `Record.from_admitted(check)` (its counter units under `count`, its
billable units under `bill`; rate state is not replayed: it is transient). `append()` only buffers; a
background task writes and fsyncs the buffer at most every `flush_interval` seconds, or at once when
`flush_batch` entries wait, so a crash loses at most that window. `replay()` applies each entry with
its id as `record_id`: the record script sets a marker per id, so an entry replayed twice (a replay that
crashed before truncating the file) is counted once, as long as the second replay comes within the
marker's TTL (`RECORD_MARKER_TTL`, 7 days). Lines that do not parse (a crash mid-write) are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from metering.redis_store import Check, Record, RedisUsageStore, StoreUnavailable

FLUSH_INTERVAL = 0.05
FLUSH_BATCH = 256
REPLAY_BATCH = 256  # records per pipeline during replay

_PAIRS = ("refund", "add", "gauges", "count", "bill")


def to_entry(record: Record) -> dict[str, Any]:
    """The JSON form of a record; it must carry a `record_id`."""
    if record.record_id is None:
        raise ValueError("a spooled record needs a record_id")
    entry: dict[str, Any] = {
        "id": record.record_id, "tenant": record.tenant, "period_start": record.period_start,
        "period_end": record.period_end, "bucket_start": record.bucket_start, "bucket_ttl": record.bucket_ttl,
    }
    for name in _PAIRS:
        entry[name] = [list(pair) for pair in getattr(record, name)]
    return entry


def _pairs(raw: Any, value_type: type) -> tuple[tuple[str, Any], ...]:
    if not isinstance(raw, list):
        raise ValueError("expected a list of [meter, value]")
    pairs = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"bad pair {item!r}")
        value = item[1]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"bad value {value!r}")
        pairs.append((item[0], value_type(value)))
    return tuple(pairs)


def from_entry(entry: Any) -> Record:
    """The record of one JSON entry; ValueError (or TypeError/KeyError) when it is not one."""
    if not isinstance(entry, dict):
        raise ValueError("an entry is a JSON object")
    ints = [entry[name] for name in ("period_start", "period_end", "bucket_start", "bucket_ttl")]
    if any(type(value) is not int for value in ints) or not isinstance(entry["tenant"], str):
        raise ValueError("bad tenant or epoch")
    if not isinstance(entry["id"], str):
        raise ValueError("bad id")
    return Record(
        entry["tenant"], *ints,
        refund=_pairs(entry["refund"], int), add=_pairs(entry["add"], int),
        gauges=_pairs(entry["gauges"], float), count=_pairs(entry["count"], int),
        bill=_pairs(entry["bill"], int), record_id=entry["id"],
    )


def _line(record: Record) -> bytes:
    return json.dumps(to_entry(record), separators=(",", ":")).encode() + b"\n"


def _parse(lines: Iterable[bytes]) -> tuple[list[Record], int]:
    records, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(from_entry(json.loads(line)))
        except (ValueError, TypeError, KeyError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            bad += 1
    return records, bad


class Spool:
    """Append-only JSON-lines file of records waiting for Redis; see the module docstring."""

    def __init__(self, path: Path, *, flush_interval: float = FLUSH_INTERVAL, flush_batch: int = FLUSH_BATCH):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no var/spool yet
        self.flush_interval = flush_interval
        self.flush_batch = flush_batch
        self.skipped = 0  # lines dropped because they did not parse
        self._buffer: list[bytes] = []
        self._full = asyncio.Event()
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._on_disk = self._recover()

    def _recover(self) -> int:
        """Count what an earlier process left, and end a torn last line so new entries start clean."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        if data and not data.endswith(b"\n"):
            with self.path.open("ab") as file:
                file.write(b"\n")
                file.flush()
                os.fsync(file.fileno())
        return len(_parse(data.splitlines())[0])

    def append(self, item: Record | Check) -> str:
        """Buffer a record (or an admitted check's counts); returns its id. On disk within flush_interval."""
        record = Record.from_admitted(item) if isinstance(item, Check) else item
        if record.record_id is None:
            record = replace(record, record_id=uuid.uuid4().hex)
        self._buffer.append(_line(record))
        if len(self._buffer) >= self.flush_batch:
            self._full.set()
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())
        return record.record_id  # type: ignore[return-value]  # set just above

    def pending(self) -> int:
        """Entries not yet replayed: on disk (valid lines) and buffered."""
        return self._on_disk + len(self._buffer)

    async def flush(self) -> None:
        """Write and fsync everything buffered."""
        async with self._lock:
            await self._write_buffer()

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.flush()

    async def replay(self, store: RedisUsageStore, *, rebucket: Callable[[Record], Record] | None = None) -> int:
        """Apply every spooled entry exactly once; returns how many left the spool.

        `rebucket` may move an entry whose billing bucket has closed meanwhile (the sync worker may have
        billed it already) into the open one. On StoreUnavailable the entries not applied stay in the
        file and the error propagates.
        """
        async with self._lock:
            await self._write_buffer()
            try:
                data = await asyncio.to_thread(self.path.read_bytes)
            except FileNotFoundError:
                return 0
            records, bad = _parse(data.splitlines())
            self.skipped += bad
            done = 0
            failure: StoreUnavailable | None = None
            for start in range(0, len(records), REPLAY_BATCH):
                batch = records[start : start + REPLAY_BATCH]
                sent = batch if rebucket is None else [rebucket(r) for r in batch]
                results = await asyncio.gather(*(store.record(r) for r in sent), return_exceptions=True)
                left: list[Record] = []
                for record, result in zip(batch, results, strict=True):
                    if isinstance(result, StoreUnavailable):
                        left.append(record)
                        failure = result
                    elif isinstance(result, ValueError | TypeError):
                        self.skipped += 1  # parsed, but not a valid record (bad meter name or id): dropped
                    elif isinstance(result, BaseException):
                        raise result
                    else:
                        done += 1
                if failure is not None:
                    remaining = left + records[start + REPLAY_BATCH :]
                    await asyncio.to_thread(self._rewrite, remaining)
                    self._on_disk = len(remaining)
                    raise failure
            await asyncio.to_thread(self._rewrite, [])
            self._on_disk = 0
            return done

    # -- file work, run in a thread ------------------------------------------------------------------

    async def _flush_soon(self) -> None:
        try:
            while self._buffer:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.flush_interval)
                self._full.clear()
                try:
                    await self.flush()
                except OSError:
                    pass  # disk full or gone: the entries stay buffered and the next round tries again
        finally:
            self._flusher = None

    async def _write_buffer(self) -> None:
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        try:
            await asyncio.to_thread(self._append, b"".join(lines))
        except BaseException:
            self._buffer[:0] = lines
            raise
        self._on_disk += len(lines)

    def _append(self, data: bytes) -> None:
        with self.path.open("ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    def _rewrite(self, records: list[Record]) -> None:
        if not records:
            with self.path.open("wb") as file:
                os.fsync(file.fileno())
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("wb") as file:
            for record in records:
                file.write(_line(record))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

