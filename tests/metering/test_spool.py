"""The fail-open spool: buffered fsync'd appends, exactly-once replay into a real Redis."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.cli.devservices import RedisProcess
from metering.redis_store import RedisUsageStore
from metering.spool import Spool
from metering.spool_entries import from_entry, to_entry
from metering.store import CounterRule, Record, StoreUnavailable
from tests.metering.test_redis_store import BUCKET, PERIOD_START, make_check, make_record, tenant

METERS = ["api_calls", "bandwidth_bytes"]


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[RedisUsageStore]:
    client = Redis.from_url(redis_server.url)
    store = RedisUsageStore(client, timeout=0.5)
    yield store
    await store.aclose()
    await client.aclose()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_append_is_buffered_then_written_within_the_interval(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl", flush_interval=0.05)
    record_id = spool.append(make_record(tenant(), add=(("bandwidth_bytes", 10),)))
    assert spool.pending() == 1 and lines(spool.path) == []
    await asyncio.sleep(0.15)
    assert [json.loads(line)["id"] for line in lines(spool.path)] == [record_id]
    assert spool.pending() == 1
    await spool.aclose()


async def test_a_full_batch_is_written_at_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl", flush_interval=10, flush_batch=256)
    ids = {spool.append(make_record(tenant(), add=(("bandwidth_bytes", 1),))) for _ in range(256)}
    await asyncio.sleep(0.05)
    assert {json.loads(line)["id"] for line in lines(spool.path)} == ids
    await spool.aclose()


async def test_entries_round_trip_through_json() -> None:
    record = make_record("acme", refund=(("api_calls", 1),), add=(("bandwidth_bytes", 5),),
                         gauges=(("storage_gb", 1.5),), count=(("api_calls", 2),), bill=(("api_calls", 2),),
                         record_id=uuid.uuid4().hex)
    assert from_entry(json.loads(json.dumps(to_entry(record)))) == record


async def test_replay_applies_each_entry_once_even_when_run_twice(
    tmp_path: Path, store: RedisUsageStore
) -> None:
    t = tenant()
    spool = Spool(tmp_path / "spool.jsonl")
    admitted = make_check(t, counters=(CounterRule("api_calls", 1, 100, True),), billable=(("api_calls", 1),))
    for _ in range(3):
        spool.append(admitted)  # a check admitted while Redis was down
    spool.append(make_record(t, add=(("bandwidth_bytes", 700),)))
    await spool.flush()
    assert spool.pending() == 4

    # A replay that crashed after applying but before truncating leaves the same file behind.
    crashed = tmp_path / "copy.jsonl"
    shutil.copy(spool.path, crashed)
    assert await spool.replay(store) == 4
    assert spool.pending() == 0 and lines(spool.path) == []
    await spool.aclose()  # a file has one owner at a time (metering.spool_files): the crashed one is gone
    shutil.copy(crashed, spool.path)
    again = Spool(spool.path)
    assert again.pending() == 4
    assert await again.replay(store) == 4
    assert again.pending() == 0

    assert await store.usage(t, PERIOD_START, METERS) == {"api_calls": 3.0, "bandwidth_bytes": 700.0}
    assert await store.bucket(t, BUCKET) == {"api_calls": 3.0, "bandwidth_bytes": 700.0}
    assert t in await store.tenants_seen_after(None, 10_000)


async def test_torn_and_corrupt_lines_are_skipped(tmp_path: Path, store: RedisUsageStore) -> None:
    t = tenant()
    path = tmp_path / "spool.jsonl"
    good = json.dumps(to_entry(make_record(t, add=(("bandwidth_bytes", 3),), record_id=uuid.uuid4().hex)))
    bad_meter = to_entry(make_record(t, add=(("Not-A-Meter", 3),), record_id=uuid.uuid4().hex))
    path.write_text("\n".join([good, "not json", "[1, 2]", '{"id": "x"}', json.dumps(bad_meter), good[:40]]))

    spool = Spool(path)  # the torn last line gets its newline, so the next entry starts clean
    assert spool.pending() == 2
    spool.append(make_record(t, add=(("bandwidth_bytes", 4),)))
    await spool.flush()
    assert await spool.replay(store) == 2
    assert spool.skipped == 5
    assert await store.usage(t, PERIOD_START, ["bandwidth_bytes"]) == {"bandwidth_bytes": 7.0}
    assert lines(path) == []


async def test_replay_keeps_entries_while_redis_is_down(tmp_path: Path, redis_server: RedisProcess) -> None:
    client = Redis.from_url(redis_server.url)
    store = RedisUsageStore(client, timeout=0.05)
    t = tenant()
    spool = Spool(tmp_path / "spool.jsonl")
    for _ in range(5):
        check = make_check(t, counters=(CounterRule("api_calls", 1, None, False),))
        spool.append(Record.from_admitted(check))
    try:
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await spool.replay(store)
        assert spool.pending() == 5 and len(lines(spool.path)) == 5
    finally:
        if redis_server.process is None:
            redis_server.start()
    for _ in range(50):
        try:
            assert await spool.replay(store) == 5
            break
        except StoreUnavailable:
            await asyncio.sleep(0.05)
    assert await store.usage(t, PERIOD_START, ["api_calls"]) == {"api_calls": 5.0}
    await store.aclose()
    await client.aclose()
