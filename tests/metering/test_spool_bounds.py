"""The fail-open spool's bounds (PRODUCT.md §5): a cap over the whole folder, write errors that never
pile up in memory, replay that streams, one owner per file (orphans of dead workers taken over), modes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import tracemalloc
import uuid
from pathlib import Path

import pytest

from metering.spool import MAX_BUFFER_BYTES, Spool
from metering.spool_entries import to_entry
from metering.store import Record
from tests.metering.test_redis_store import make_record, tenant
from tests.support import ROOT

CAP = 1 << 20


class MemoryStore:
    """Stands in for `RedisUsageStore.record`: applies each record id once, and counts the calls."""

    def __init__(self, *, keep_ids: bool = True) -> None:
        self.calls = 0
        self.ids: list[str] = []
        self._keep_ids = keep_ids

    async def record(self, record: Record) -> bool:
        self.calls += 1
        if self._keep_ids:
            self.ids.append(record.record_id or "")
        return True


def folder_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def byte_record(t: str, units: int = 1) -> Record:
    return make_record(t, add=(("bandwidth_bytes", units),))


def write_orphan(path: Path, t: str, n: int) -> list[str]:
    """A spool file as a dead worker left it: `n` entries, each with its own id."""
    ids = [uuid.uuid4().hex for _ in range(n)]
    with path.open("w") as file:
        for record_id in ids:
            file.write(json.dumps(to_entry(make_record(t, add=(("bandwidth_bytes", 1),), record_id=record_id))) + "\n")
    return ids


async def test_the_cap_covers_the_folder_and_full_refuses_before_it(tmp_path: Path) -> None:
    other = tmp_path / "worker-9.jsonl"  # another worker's file counts against the same cap
    write_orphan(other, tenant(), 1000)
    spool = Spool(tmp_path / "worker-0.jsonl", max_bytes=CAP, flush_interval=10)
    t = tenant()
    admitted = 0
    for _ in range(20_000):  # far more than the cap holds
        if spool.full:
            break
        spool.append(byte_record(t))
        admitted += 1
        if admitted % 100 == 0:  # the flusher's job, done here without waiting for it
            await spool.flush()
            assert folder_bytes(tmp_path) <= CAP
    assert spool.full, "the spool never said it was full"
    assert admitted < 20_000
    # What follows admitted requests (their byte counts) still fits, up to the cap itself; past it, dropped.
    for i in range(5_000):
        spool.append(byte_record(t))
        if i % 100 == 0:
            await spool.flush()
    await spool.flush()
    assert folder_bytes(tmp_path) <= CAP
    assert spool.dropped > 0
    assert CAP * 0.9 < spool.bytes() + other.stat().st_size <= CAP
    await spool.aclose()


async def test_a_warning_is_logged_past_80_percent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "worker-0.jsonl", max_bytes=CAP, flush_interval=10)
    t = tenant()
    with caplog.at_level(logging.WARNING, logger="cosmos_gateway.spool"):
        while spool.bytes() < CAP * 0.7:
            spool.append(byte_record(t))
            await spool.flush()
        assert not [r for r in caplog.records if "full" in r.getMessage()]
        while spool.bytes() < CAP * 0.85:
            spool.append(byte_record(t))
            await spool.flush()
    warnings = [r for r in caplog.records if "full" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    await spool.aclose()


# A disk that fills up: RLIMIT_FSIZE makes writes past 64 KiB fail (EFBIG, after a short write), as ENOSPC would.
DISK_FULL = textwrap.dedent("""
    import asyncio, json, resource, signal, sys, tracemalloc
    from pathlib import Path
    from metering.spool import Spool
    from tests.metering.test_redis_store import make_record

    async def main(directory):
        spool = Spool(Path(directory) / "worker-0.jsonl", flush_interval=0.01)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
        tracemalloc.start()
        full_seen = 0
        for i in range(60_000):
            spool.append(make_record("t-disk", add=(("bandwidth_bytes", 1),)))
            full_seen += bool(getattr(spool, "full", False))
            if i % 200 == 0:
                await asyncio.sleep(0.002)
        await asyncio.sleep(0.1)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
        await spool.flush()
        text = (Path(directory) / "worker-0.jsonl").read_text()
        valid = sum(1 for line in text.splitlines() if json.loads(line)["tenant"] == "t-disk")
        print(json.dumps({"held": held, "full_seen": full_seen, "valid": valid, "pending": spool.pending(),
                          "dropped": getattr(spool, "dropped", 0)}))
        await spool.aclose()

    asyncio.run(main(sys.argv[1]))
""")


def test_a_full_disk_refuses_and_never_buffers_without_bound(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["full_seen"] > 0, result  # admissions are refused while writes fail
    # 60,000 records (~18 MB) were offered; memory stays within the buffer's bound (MAX_BUFFER_BYTES).
    assert result["held"] < MAX_BUFFER_BYTES * 1.5, result
    assert result["dropped"] > 0, result
    # Every line on disk is whole (a short write was cut back), and nothing kept is lost.
    assert result["valid"] == result["pending"] > 0, result


async def test_replay_and_recovery_stream_the_file(tmp_path: Path) -> None:
    path = tmp_path / "worker-0.jsonl"
    n = 30_000  # ~10 MB
    t = tenant()
    line = json.dumps(to_entry(make_record(t, add=(("bandwidth_bytes", 1),), record_id="x" * 32)))
    with path.open("w") as file:
        for i in range(n):
            file.write(line.replace("x" * 32, f"{i:032d}") + "\n")
    size = path.stat().st_size
    store = MemoryStore(keep_ids=False)
    tracemalloc.start()
    try:
        spool = Spool(path)
        assert spool.pending() == n
        assert await spool.replay(store) == n  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert store.calls == n
    assert peak < size / 4, f"replay held {peak} bytes of a {size}-byte spool"
    assert spool.pending() == 0
    await spool.aclose()


async def test_orphans_are_taken_over_but_never_a_live_writers_file(tmp_path: Path) -> None:
    dead_ids = write_orphan(tmp_path / "worker-3.jsonl", tenant(), 40)
    live = Spool(tmp_path / "worker-1.jsonl")  # another worker, alive
    live_id = live.append(byte_record(tenant()))
    await live.flush()
    spool = Spool(tmp_path / "worker-0.jsonl")
    await spool.adopt()
    assert spool.pending() == 40
    store = MemoryStore()
    assert await spool.replay(store) == 40  # type: ignore[arg-type]
    assert sorted(store.ids) == sorted(dead_ids)
    assert not (tmp_path / "worker-3.jsonl").exists()
    assert [json.loads(x)["id"] for x in live.path.read_text().splitlines()] == [live_id]
    await spool.adopt()
    assert spool.pending() == 0
    await live.aclose()
    await spool.aclose()


async def test_two_replayers_share_out_the_orphans(tmp_path: Path) -> None:
    ids = [i for k in range(20) for i in write_orphan(tmp_path / f"worker-{k + 10}.jsonl", tenant(), 5)]
    first, second = Spool(tmp_path / "worker-0.jsonl"), Spool(tmp_path / "worker-1.jsonl")
    await asyncio.gather(first.adopt(), second.adopt(), first.adopt(), second.adopt())
    assert first.pending() + second.pending() == len(ids)
    store = MemoryStore()
    await asyncio.gather(first.replay(store), second.replay(store))  # type: ignore[arg-type]
    assert sorted(store.ids) == sorted(ids)  # each file by one of them: every entry sent exactly once
    assert sorted(os.listdir(tmp_path)) == ["worker-0.jsonl", "worker-1.jsonl"]
    await first.aclose()
    await second.aclose()


async def test_a_worker_restarted_on_its_own_file_takes_it_back(tmp_path: Path) -> None:
    path = tmp_path / "worker-0.jsonl"
    ids = write_orphan(path, tenant(), 3)
    spool = Spool(path)
    assert spool.path == path and spool.pending() == 3
    busy = Spool(path)  # the name is held: a second writer never shares a file, it takes its own
    assert busy.path != path and busy.pending() == 0
    store = MemoryStore()
    assert await spool.replay(store) == 3  # type: ignore[arg-type]
    assert store.ids == ids
    await busy.aclose()
    await spool.aclose()
    assert not busy.path.exists() and not path.exists()  # empty spool files are removed on close


async def test_spool_files_and_folder_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        directory = tmp_path / "var" / "spool"
        spool = Spool(directory / "worker-0.jsonl")
        spool.append(byte_record(tenant()))
        await spool.flush()
    finally:
        os.umask(old)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(spool.path.stat().st_mode) == 0o600
    await spool.aclose()
