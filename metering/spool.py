"""Fail-open spool: usage counted while Redis was unavailable, kept on local disk until replayed.

One JSON object per line, each a `Record` with a unique id (the format: `metering.spool_entries`).
An admitted check is spooled as `Record.from_admitted(check)` (its counter units under `count`, its
billable units under `bill`; rate state is not replayed: it is transient). `append()` only buffers; a
background task writes and fsyncs the buffer at most every `flush_interval` seconds, or at once when
`flush_batch` entries wait, so a crash loses at most that window. `replay()` applies each entry with
its id as `record_id`: the record script sets a marker per id, so an entry replayed twice (a replay that
crashed before truncating the file) is counted once, as long as the second replay comes within the
marker's TTL (`RECORD_MARKER_TTL`, 7 days). Lines that do not parse (a crash mid-write) are skipped.

Bounds. All spool files of the folder together stay within `max_bytes` (`redis.spool_max_bytes`):
`full` turns true a reserve below the cap (and while the disk refuses writes), and the limiter then
refuses admissions with 503 as under fail_closed; the records of requests already admitted still fit
in the reserve, and what would pass the cap itself is dropped and counted (`dropped`). Lines wait in
memory only up to `MAX_BUFFER_BYTES`. Replay and recovery read the files in chunks, never whole.

Ownership (`metering.spool_files`). Each file has one owner, the holder of its exclusive flock: the
worker writing it, or the spool that took it over once its writer was gone. `adopt()` claims every
file of the folder that nobody holds (a worker that no longer runs after `--workers` was lowered, a
`serve` that stopped, a crashed replayer), and `replay()` then replays and removes it. A name already
held (two `serve` processes on one folder) makes a writer take a name of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from metering.spool_entries import line_of, parse_line, read_batch
from metering.spool_files import SUFFIX, TEMPORARY, SpoolFile, make_private_folder, other_files
from metering.store import Check, Record, StoreUnavailable, UsageStore

log = logging.getLogger("cosmos_gateway.spool")

FLUSH_INTERVAL = 0.05
FLUSH_BATCH = 256
FLUSH_BYTES = 64 * 1024  # a batch goes out at once also when its lines add up to this
REPLAY_BATCH = 256  # records per pipeline during replay
DEFAULT_MAX_BYTES = 1 << 30
MAX_BUFFER_BYTES = 4 << 20  # lines waiting in memory while the disk refuses them; past this, dropped
RESCAN_SECONDS = 0.1  # past half the cap, the other files of the folder are measured this often
WARN_AT = 0.8  # of the cap: a warning is logged (once, until the spool is back under 60 %)

def _count(file: SpoolFile) -> int:
    """The entries of a file (read in chunks)."""
    return sum(1 for line, _ in file.lines(0, file.size) if parse_line(line) is not None)


@dataclass(slots=True)
class _Orphan:
    """A file taken over from a worker that no longer runs: replayed from `offset`, then removed."""

    file: SpoolFile
    entries: int
    offset: int = 0


class Spool:
    """Append-only JSON-lines files of records waiting for Redis; see the module docstring."""

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, flush_interval: float = FLUSH_INTERVAL,
                 flush_batch: int = FLUSH_BATCH) -> None:
        path = Path(path)
        self.folder = path.parent
        make_private_folder(self.folder)  # a fresh checkout has no var/spool yet
        self.max_bytes = max_bytes
        # Admissions stop this far below the cap, so that what follows the requests already admitted
        # (byte counts, refunds) still fits, also while other workers of the folder fill it at once.
        self._admit_below = max_bytes - max(max_bytes // 16, 16 * 1024)
        self._buffer_limit = min(MAX_BUFFER_BYTES, max_bytes // 4)
        self.flush_interval = flush_interval
        self.flush_batch = flush_batch
        self.skipped = 0  # lines dropped because they did not parse
        self.dropped = 0  # records refused because the spool was at its cap (or the disk full)
        self._buffer: list[bytes] = []
        self._buffered = 0  # bytes in _buffer, and in a write under way
        self._batch_ready = asyncio.Event()
        # Group commit: lines appended and lines on disk, counted; `sync()` waits for the second to reach the
        # first, and every successful write wakes those waiting.
        self._appended = 0
        self._synced = 0
        self._written: asyncio.Event | None = None
        self._lock = asyncio.Lock()  # writes to the live file
        self._replaying = asyncio.Lock()  # one replay or takeover at a time
        self._flusher: asyncio.Task[None] | None = None
        self._failing = False  # the last write failed (disk full): admissions refused until one succeeds
        self._warned = False
        self._file = self._open_live(path)
        self._file.end_torn_line()
        self._on_disk = _count(self._file)  # entries of the live file not yet applied
        self._replayed_to = 0  # the live file's entries before this offset are applied
        self._orphans: list[_Orphan] = []
        self._orphan_bytes = 0
        self._others = sum(size for _, size in other_files(self.folder, {self._file.path.name}))
        self._measured_at = time.monotonic()

    @staticmethod
    def _open_live(preferred: Path) -> SpoolFile:
        """The worker's own file: `preferred` (left by its predecessor, or new), unless another live spool
        holds that name; then a name of its own."""
        for name in [preferred.name] * 3 + [f"{preferred.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
                                            for _ in range(3)]:
            file = SpoolFile.claim(preferred.with_name(name), create=True)
            if file is not None:
                return file
        raise OSError(f"no spool file of {preferred.parent} could be locked")

    @property
    def path(self) -> Path:
        """The file this spool writes."""
        return self._file.path

    # -- appending -----------------------------------------------------------------------------------

    def append(self, item: Record | Check) -> str | None:
        """Buffer a record (or an admitted check's counts); returns its id, or None when it was dropped
        because the spool is at its cap. On disk within flush_interval."""
        record = Record.from_admitted(item) if isinstance(item, Check) else item
        if record.record_id is None:
            record = replace(record, record_id=uuid.uuid4().hex)
        line = line_of(record)
        size = len(line)
        if self._buffered + size > self._buffer_limit or self._total() + size > self.max_bytes:
            self._drop()
            return None
        self._buffer.append(line)
        self._buffered += size
        self._appended += 1
        if len(self._buffer) >= self.flush_batch or self._buffered >= FLUSH_BYTES:
            self._batch_ready.set()
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())
        return record.record_id

    @property
    def full(self) -> bool:
        """Admissions must be refused: the folder is near the cap, or the disk refuses writes."""
        return (self._failing or self._buffered >= self._buffer_limit // 2
                or self._total() >= self._admit_below)

    def pending(self) -> int:
        """Entries not yet replayed: on disk (valid lines), buffered, and in files taken over."""
        return self._on_disk + len(self._buffer) + sum(o.entries for o in self._orphans)

    def bytes(self) -> int:
        """What this spool holds: its file, the files it took over, and its buffer."""
        return self._file.size + self._orphan_bytes + self._buffered

    def _total(self) -> int:
        return self._others + self._file.size + self._orphan_bytes + self._buffered

    def _drop(self) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 10_000 == 0:
            log.error("fail-open spool %s is full (%d of %d bytes%s): %d usage records dropped so far",
                      self.folder, self._total(), self.max_bytes, ", the disk refuses writes" if self._failing
                      else "", self.dropped)

    async def flush(self) -> None:
        """Write and fsync everything buffered; OSError when the disk refuses (the lines stay buffered)."""
        async with self._lock:
            await self._write_buffer()

    async def sync(self) -> None:
        """Wait until every line appended so far is written and fsync'd (bound the wait with
        `asyncio.timeout`). Concurrent callers share one write (a group commit): an admission under
        fail_open waits for this before its request goes on, so a SIGKILL cannot lose what was counted at
        admission."""
        target = self._appended
        while self._synced < target:
            if self._written is None:
                self._written = asyncio.Event()
            written = self._written
            self._batch_ready.set()  # the flusher writes now instead of at the end of its interval
            if self._flusher is None:
                self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())
            await written.wait()

    async def aclose(self) -> None:
        """Write what is buffered and let go of the files; an empty file of ours is removed."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        try:
            await self.flush()
        except OSError as error:
            log.error("fail-open spool %s: %d usage records could not be written: %r", self.folder,
                      len(self._buffer), error)
        async with self._replaying:
            if self._file.fd >= 0:
                if self._file.size == 0:
                    self._file.remove()
                else:
                    self._file.close()  # replayed by whoever takes the file over: the next worker, or another
            for orphan in self._orphans:
                orphan.file.close()
            self._orphans.clear()
            self._orphan_bytes = 0

    async def _flush_soon(self) -> None:
        try:
            while self._buffer:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_ready.wait(), self.flush_interval)
                self._batch_ready.clear()
                try:
                    await self.flush()
                except OSError:  # disk full or gone: the lines stay buffered (bounded), tried again soon
                    await asyncio.sleep(self.flush_interval)
        finally:
            self._flusher = None

    async def _write_buffer(self) -> None:
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        data = b"".join(lines)
        write = asyncio.ensure_future(asyncio.to_thread(self._file.append, data))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            await asyncio.wait([write])  # the thread writes on regardless: account for what it did
            self._settle_write(write, lines, len(data))
            raise
        self._settle_write(write, lines, len(data))
        await self._measure_if_near()

    def _settle_write(self, write: asyncio.Future[None], lines: list[bytes], size: int) -> None:
        error = write.exception()
        if error is not None:
            self._buffer[:0] = lines
            if not self._failing:
                log.warning("fail-open spool %s: writing failed (%r); admissions are refused until it works",
                            self.folder, error)
            self._failing = True
            raise error
        self._buffered -= size
        self._on_disk += len(lines)
        self._synced += len(lines)
        if self._written is not None:
            self._written.set()
            self._written = None
        if self._failing:
            log.warning("fail-open spool %s: writing works again", self.folder)
            self._failing = False

    async def _measure_if_near(self) -> None:
        """Near the cap, what the other workers of the folder spool matters: measure it again."""
        now = time.monotonic()
        if self._total() >= self.max_bytes // 2 and now - self._measured_at >= RESCAN_SECONDS:
            self._measured_at = now
            own = {self._file.path.name, *(o.file.path.name for o in self._orphans)}
            found = await asyncio.to_thread(other_files, self.folder, own)
            self._others = sum(size for _, size in found)
        self._check_level()

    def _check_level(self) -> None:
        total = self._total()
        if not self._warned and total >= self.max_bytes * WARN_AT:
            self._warned = True
            log.warning("fail-open spool %s is %d%% full (%d of %d bytes, redis.spool_max_bytes); when it is "
                        "full, requests are refused with 503 until Redis is back", self.folder,
                        100 * total // self.max_bytes, total, self.max_bytes)
        elif self._warned and total < self.max_bytes * WARN_AT * 0.75:
            self._warned = False

    # -- taking over and replaying -------------------------------------------------------------------

    async def adopt(self) -> int:
        """Take over the folder's spool files that no live spool holds (their writers are gone); they are
        replayed by the next `replay()`. Returns how many were taken. Also measures the folder."""
        async with self._replaying:
            if self._file.fd < 0:
                return 0
            own = {self._file.path.name, *(o.file.path.name for o in self._orphans)}
            claimed, others = await asyncio.to_thread(self._claim_others, own)
            for file, entries in claimed:
                self._orphans.append(_Orphan(file, entries))
                self._orphan_bytes += file.size
                log.info("fail-open spool: took over %s (%d entries) to replay it", file.path, entries)
            self._others = others
            self._measured_at = time.monotonic()
            self._check_level()
            return len(claimed)

    def _claim_others(self, own: set[str]) -> tuple[list[tuple[SpoolFile, int]], int]:
        """Run in a thread: claim every other file of the folder nobody holds; the bytes of those held."""
        claimed, held = [], 0
        for path, size in other_files(self.folder, own):
            file = SpoolFile.claim(path, create=False)
            if file is None:
                held += size  # its owner lives (or it is gone already)
            elif path.name.endswith(TEMPORARY):
                file.remove()  # a rewrite that crashed midway; the file it was made from is whole
            else:
                claimed.append((file, _count(file)))
        return claimed, held

    async def replay(self, store: UsageStore, *, rebucket: Callable[[Record], Record] | None = None) -> int:
        """Apply every spooled entry exactly once (this spool's file and those it took over); returns how
        many left the spool.

        `rebucket` may move an entry whose billing bucket has closed meanwhile (the sync worker may have
        billed it already) into the open one. On StoreUnavailable the entries not applied stay on disk,
        the next replay goes on from the last batch applied, and the error propagates.
        """
        async with self._replaying:
            if self._file.fd < 0:
                return 0
            async with self._lock:
                with contextlib.suppress(OSError):  # the disk refuses writes: replay what it holds
                    await self._write_buffer()
                end = self._file.size
            done = 0
            if self._replayed_to < end:
                done += await self._replay_range(self._file, self._replayed_to, end, store, rebucket,
                                                 self._live_progress)
            if end:
                async with self._lock:  # everything before `end` is applied: only what came later stays
                    if self._file.size == end:
                        await asyncio.to_thread(self._file.truncate)
                    else:
                        self._file = await asyncio.to_thread(self._file.replace_with_tail, end)
                    self._replayed_to = 0
            for orphan in list(self._orphans):

                def progress(offset: int, entries: int, orphan: _Orphan = orphan) -> None:
                    orphan.offset = offset
                    orphan.entries -= entries

                done += await self._replay_range(orphan.file, orphan.offset, orphan.file.size, store, rebucket,
                                                 progress)
                self._orphans.remove(orphan)
                self._orphan_bytes -= orphan.file.size
                await asyncio.to_thread(orphan.file.remove)
            return done

    def _live_progress(self, offset: int, entries: int) -> None:
        self._replayed_to = offset
        self._on_disk -= entries

    async def _replay_range(self, file: SpoolFile, start: int, end: int, store: UsageStore,
                            rebucket: Callable[[Record], Record] | None,
                            progress: Callable[[int, int], None]) -> int:
        """Replay the entries of `file` in [start, end), batch by batch; `progress(offset, entries)` after
        each batch applied in full."""
        lines = file.lines(start, end)
        done = 0
        while True:
            records, bad, offset = await asyncio.to_thread(read_batch, lines, REPLAY_BATCH)
            if offset is None:
                return done
            sent = records if rebucket is None else [rebucket(r) for r in records]
            results = await asyncio.gather(*(store.record(r) for r in sent), return_exceptions=True)
            failure: StoreUnavailable | None = None
            rejected = 0
            for result in results:
                if isinstance(result, StoreUnavailable):
                    failure = result
                elif isinstance(result, ValueError | TypeError):
                    rejected += 1  # parsed, but not a valid record (bad meter name or id): dropped
                elif isinstance(result, BaseException):
                    raise result
            if failure is not None:
                raise failure  # this batch is read again next time (what it applied is not applied twice)
            self.skipped += bad + rejected
            done += len(records) - rejected
            progress(offset, len(records))
