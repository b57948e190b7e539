"""Usage history query time (issue 13 §1): one tenant's month out of a big ledger, on SQLite and PostgreSQL.

    .venv/bin/python bench/usage_history.py [--tenants 10000] [--days 30] [--backends sqlite,postgres] [--reuse]

Fills `usage_ledger` (the schema of `cosmos-gateway db upgrade`) with --tenants x --days of 5-minute buckets of
`api_calls` (a counter) and, with --gauge, `storage_gb` too: set-based inserts (generate_series on PostgreSQL; on
SQLite one INSERT ... SELECT per bucket, on a connection without journal or fsync), in time order as the sync
worker writes them (every tenant's bucket, then the next bucket), so one tenant's rows lie scattered over the
table as in production. The indexes are dropped for the load and built again after it, as the migrations define
them (SQLite keeps its primary key and unique constraint: they live in the table). The reads use the gateway's
engine (metering/db.py), on SQLite opened after the load. 10,000 tenants x 30 days on SQLite: ~30 minutes and
32 GiB on disk (delete --sqlite-file after). Then it times `UsageHistory.read` for one tenant in the middle of the
id range, --rounds times each (medians, and p90), for:

    day, month        30 steps, every row summed by the database (the month is over a day ago)
    hour, month       720 steps (more than the API's 400: the query's cost for a whole month)
    hour, 400 h       the longest range the API allows
    day, month, live  the month ending now: the last day read row by row and its buckets asked of Redis

and prints the plans of the statements that read the ledger (EXPLAIN ANALYZE on PostgreSQL, EXPLAIN QUERY PLAN on
SQLite), to show they stay a range scan of the primary key (tenant_id, meter, bucket_start) whatever the table's
size. Not part of `make test`. PostgreSQL: a database `gw_bench_history` on --postgres-url, kept for --reuse.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.cli.devservices import RedisProcess  # noqa: E402
from metering import db  # noqa: E402
from metering.meters import DEFAULT_METERS  # noqa: E402
from metering.migrate import upgrade_async  # noqa: E402
from metering.usage_history import UsageHistory  # noqa: E402

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
PG_DATABASE = "gw_bench_history"
END = datetime(2026, 12, 1, tzinfo=UTC)  # the filled days end here
BUCKET = 300
# What the PostgreSQL load drops and builds again besides the secondary index: the constraints' indexes (SQLite
# keeps those inside the table definition, so there only the named index goes).
PG_INDEXES = [
    ("ALTER TABLE usage_ledger DROP CONSTRAINT pk_usage_ledger",
     "ALTER TABLE usage_ledger ADD CONSTRAINT pk_usage_ledger PRIMARY KEY (tenant_id, meter, bucket_start)"),
    ("ALTER TABLE usage_ledger DROP CONSTRAINT uq_usage_ledger_identifier",
     "ALTER TABLE usage_ledger ADD CONSTRAINT uq_usage_ledger_identifier UNIQUE (identifier)"),
]


def tenant_id(i: int) -> str:
    return f"tenant-{i:06d}"


def pg_fill(meter: str, kind: str, tenants: int, days: int) -> str:
    first = int(END.timestamp()) - days * 86_400
    value = "(t % 7) + 1" if kind == "counter" else "((t % 50) + (b % 288)) / 4.0"
    return f"""
        INSERT INTO usage_ledger (tenant_id, meter, bucket_start, value, kind, state, identifier, attempts, created_at)
        SELECT 'tenant-' || lpad(t::text, 6, '0'), '{meter}', to_timestamp({first} + b * {BUCKET}), {value},
               '{kind}', 'sent', 'cg1_{meter}_' || ({first} + b * {BUCKET}) || '_' || md5(t::text || '/' || b),
               1, now()
        FROM generate_series(0, {days * 288 - 1}) AS b, generate_series(0, {tenants - 1}) AS t ORDER BY b, t"""


# Load-time settings of the SQLite connection that fills the table, and of it only: no rollback journal and no
# fsync (a crash mid-load means a rerun), and a page cache that holds the pages the fill keeps touching (the last
# leaf of each tenant in the primary key, the tail of the identifier index). The timed reads use the gateway's
# own engine (metering/db.py: WAL), opened after the load.
SQLITE_LOAD_PRAGMAS = (
    "PRAGMA journal_mode=OFF",
    "PRAGMA synchronous=OFF",
    "PRAGMA cache_size=-1048576",  # KiB: 1 GiB
    "PRAGMA threads=2",  # CREATE INDEX sorts with a helper thread
)


def sqlite_bucket_fill(meters: list[tuple[str, str]]) -> str:
    """One bucket's rows of every tenant and meter, in the order the sync worker commits them (tenant, meter),
    from the small tables of sqlite_load; parameters: the bucket's epoch, its index b and its ledger timestamp."""
    values = " ".join(
        f"WHEN '{meter}' THEN " + ("(t % 7) + 1" if kind == "counter" else "((t % 50) + (:b % 288)) / 4.0")
        for meter, kind in meters)
    return f"""
        INSERT INTO usage_ledger (tenant_id, meter, bucket_start, value, kind, state, identifier, attempts, created_at)
        SELECT tenant_id, meter, :start, CASE meter {values} END, kind, 'sent',
               'cg1_' || meter || '_' || :epoch || '_' || hex(randomblob(20)), 1, '2026-12-01 00:00:00.000000'
        FROM temp.bench_tenants, temp.bench_meters ORDER BY t, meter"""


def sqlite_load(path: str, meters: list[tuple[str, str]], tenants: int, days: int, started: float) -> None:
    """Fills the ledger of a freshly migrated file: one INSERT ... SELECT per bucket (every tenant's row of the
    bucket, then the next bucket), a transaction per day; then the secondary index and ANALYZE."""
    from sqlalchemy.dialects import sqlite as sqlite_dialect
    from sqlalchemy.schema import CreateIndex

    from metering.models import LedgerEntry

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for pragma in SQLITE_LOAD_PRAGMAS:
            conn.execute(pragma)
        # The primary key and UNIQUE (identifier) are part of the table's definition in SQLite and stay: what
        # the fill costs is theirs, as in production. The named secondary index goes and is built after.
        for index in LedgerEntry.__table__.indexes:
            conn.execute(f"DROP INDEX IF EXISTS {index.name}")
        conn.execute("DROP INDEX IF EXISTS ix_usage_ledger_state")
        conn.execute("CREATE TEMP TABLE bench_tenants (t INTEGER PRIMARY KEY, tenant_id TEXT NOT NULL)")
        conn.executemany("INSERT INTO temp.bench_tenants VALUES (?, ?)", ((t, tenant_id(t)) for t in range(tenants)))
        conn.execute("CREATE TEMP TABLE bench_meters (meter TEXT PRIMARY KEY, kind TEXT NOT NULL)")
        conn.executemany("INSERT INTO temp.bench_meters VALUES (?, ?)", meters)
        fill = sqlite_bucket_fill(meters)
        first = int(END.timestamp()) - days * 86_400
        for day in range(days):
            conn.execute("BEGIN")
            for b in range(day * 288, (day + 1) * 288):
                epoch = first + b * BUCKET
                stamp = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S.000000")
                conn.execute(fill, {"start": stamp, "epoch": epoch, "b": b})
            conn.execute("COMMIT")
            if (day + 1) % max(1, days // 10) == 0 or day + 1 == days:
                print(f"  day {day + 1}/{days}: {(day + 1) * 288 * tenants * len(meters):,} rows loaded "
                      f"({time.monotonic() - started:.0f} s)", flush=True)
        for index in LedgerEntry.__table__.indexes:  # as the model (= the migrations) defines it
            conn.execute(str(CreateIndex(index).compile(dialect=sqlite_dialect.dialect())))
        print(f"  secondary index built ({time.monotonic() - started:.0f} s)", flush=True)
        conn.execute("ANALYZE")
    finally:
        conn.close()


async def build(engine: AsyncEngine, dialect: str, meters: list[tuple[str, str]], tenants: int, days: int) -> float:
    started = time.monotonic()
    await upgrade_async(engine)
    if dialect == "sqlite":
        # The load runs on a connection of its own with the load-time pragmas; the engine is closed meanwhile
        # (journal_mode can leave WAL only with no other connection open).
        await engine.dispose()
        path = make_url(str(engine.url)).database
        assert path
        await asyncio.to_thread(sqlite_load, path, meters, tenants, days, started)
        return time.monotonic() - started
    async with engine.begin() as conn:
        await conn.exec_driver_sql("DELETE FROM usage_ledger")
        for drop, _ in PG_INDEXES:
            await conn.exec_driver_sql(drop)
        await conn.exec_driver_sql("DROP INDEX IF EXISTS ix_usage_ledger_pending_order")
        await conn.exec_driver_sql("DROP INDEX IF EXISTS ix_usage_ledger_state")
    for meter, kind in meters:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(pg_fill(meter, kind, tenants, days))
            print(f"  {meter}: {tenants * days * 288:,} rows loaded ({time.monotonic() - started:.0f} s)", flush=True)
    async with engine.begin() as conn:
        for _, create in PG_INDEXES:
            await conn.exec_driver_sql(create)
    await secondary_indexes(engine)
    async with engine.begin() as conn:
        await conn.exec_driver_sql("ANALYZE usage_ledger")
    # The visibility map set, as autovacuum would have it on an old table.
    async with engine.connect() as conn:
        await (await conn.get_raw_connection()).driver_connection.execute("VACUUM usage_ledger")
    return time.monotonic() - started


async def secondary_indexes(engine: AsyncEngine) -> None:
    """The ledger's secondary index as this tree's model declares it (ix_usage_ledger_pending_order, or before
    migration 0003 ix_usage_ledger_state), built after the load."""
    from metering.models import LedgerEntry

    async with engine.begin() as conn:
        for index in LedgerEntry.__table__.indexes:
            await conn.run_sync(lambda sync, index=index: index.create(sync, checkfirst=True))


def timed(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"median {statistics.median(values) * 1000:7.2f} ms   p90 {p90 * 1000:7.2f} ms"


class Capture:
    """The statements a read sends (to EXPLAIN them exactly as sent)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.statements: list[tuple[str, Any]] = []
        self.on = False
        event.listen(engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if self.on and "usage_ledger" in statement:
            self.statements.append((statement, parameters))


async def explain(engine: AsyncEngine, dialect: str, statements: list[tuple[str, Any]]) -> None:
    async with engine.connect() as conn:
        for statement, parameters in statements:
            prefix = "EXPLAIN (ANALYZE, BUFFERS) " if dialect == "postgresql" else "EXPLAIN QUERY PLAN "
            rows = (await conn.exec_driver_sql(prefix + statement, parameters)).all()
            print("    " + " ".join(statement.split())[:160] + " ...")
            for row in rows:
                print("      " + " | ".join(str(part) for part in row[-1:]))


def remove_sqlite_file(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(path + suffix).unlink(missing_ok=True)


async def run(backend: str, args: argparse.Namespace, redis: RedisProcess) -> None:
    if backend == "postgresql":
        server = make_url(args.postgres_url)
        import asyncpg

        admin = await asyncpg.connect(server.set(drivername="postgresql").render_as_string(hide_password=False))
        try:
            if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", PG_DATABASE):
                await admin.execute(f'CREATE DATABASE "{PG_DATABASE}"')
        finally:
            await admin.close()
        url = server.set(drivername="postgresql+asyncpg", database=PG_DATABASE).render_as_string(hide_password=False)
    else:
        url = f"sqlite+aiosqlite:///{args.sqlite_file}"
        if not args.reuse:  # a fresh file: emptying a big table costs more than the fill
            await asyncio.to_thread(remove_sqlite_file, args.sqlite_file)
    engine = db.create_engine(url)
    meters = [("api_calls", "counter")] + ([("storage_gb", "gauge")] if args.gauge else [])
    print(f"\n== {backend}: {args.tenants:,} tenants x {args.days} days of 5-minute buckets x {len(meters)} meter(s)")
    if not args.reuse:
        seconds = await build(engine, backend, meters, args.tenants, args.days)
        print(f"  built in {seconds:.0f} s")
    # From here on the gateway's own engine (on SQLite reconnected after the load: WAL, as metering/db.py sets it).
    async with engine.connect() as conn:
        rows = (await conn.exec_driver_sql("SELECT count(*) FROM usage_ledger")).scalar()
        size = (await conn.exec_driver_sql(
            "SELECT pg_total_relation_size('usage_ledger')" if backend == "postgresql"
            else "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")).scalar()
    print(f"  usage_ledger: {rows:,} rows, {size / 2**30:.2f} GiB with its indexes")

    from redis.asyncio import Redis

    client = Redis.from_url(redis.url)
    sessions = db.session_factory(engine)
    names = [name for name, _ in meters]
    end = int(END.timestamp())
    month = end - args.days * 86_400
    cases = [("day, month", "day", month, end, end + 2 * 86_400),
             ("hour, month", "hour", month, end, end + 2 * 86_400),
             ("hour, 400 h", "hour", end - 400 * 3600, end, end + 2 * 86_400),
             ("day, month, live", "day", month, end, end - 60)]
    if args.covering:  # what an index holding `value` would change: not in the schema (see the report)
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                "CREATE INDEX IF NOT EXISTS ix_bench_history ON usage_ledger (tenant_id, meter, bucket_start) INCLUDE "
                "(value)" if backend == "postgresql" else
                "CREATE INDEX IF NOT EXISTS ix_bench_history ON usage_ledger (tenant_id, meter, bucket_start, value)")
            await conn.exec_driver_sql("ANALYZE usage_ledger" if backend == "postgresql" else "ANALYZE")
        print("  with a covering index ix_bench_history (tenant_id, meter, bucket_start) + value")
    capture = Capture(engine)
    tenant = tenant_id(args.tenants // 2)
    for label, step, start, stop, now in cases:
        history = UsageHistory(sessions, client, DEFAULT_METERS, bucket_seconds=BUCKET, clock=lambda now=now: now)
        result = await history.read(tenant, names, step, start, stop)  # warm: the pages in the cache
        expected = ((args.tenants // 2) % 7 + 1) * (stop - start) // BUCKET  # the fill's value of the tenant
        got = sum(v for _, v in result.series["api_calls"] if v is not None)
        assert got == expected, (label, got, expected)
        samples = []
        for _ in range(args.rounds):
            began = time.perf_counter()
            await history.read(tenant, names, step, start, stop)
            samples.append(time.perf_counter() - began)
        print(f"  {label:18} {len(result.series['api_calls']):4} steps   {timed(samples)}")
        if label in ("day, month", "hour, month", "day, month, live"):
            capture.statements, capture.on = [], True
            await history.read(tenant, names, step, start, stop)
            capture.on = False
            await explain(engine, backend, capture.statements)
    await client.aclose()
    await engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--gauge", action="store_true", help="storage_gb too (a gauge: its last value per step)")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--postgres-url", default=os.environ.get("TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    parser.add_argument("--sqlite-file", default=str(ROOT / "var" / "bench-history.db"),
                        help="made afresh (an existing file is deleted) unless --reuse")
    parser.add_argument("--reuse", action="store_true", help="time the databases a previous run built")
    parser.add_argument("--covering", action="store_true",
                        help="add an index holding `value` first (not in the schema: to measure what it would change)")
    args = parser.parse_args()
    Path(args.sqlite_file).parent.mkdir(parents=True, exist_ok=True)
    redis = RedisProcess().start()
    try:
        for backend in args.backends.split(","):
            backend = backend.strip()
            await run("postgresql" if backend in ("postgres", "postgresql") else backend, args, redis)
    finally:
        redis.close()


if __name__ == "__main__":
    asyncio.run(main())
