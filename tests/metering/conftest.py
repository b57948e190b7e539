"""SQL store fixtures: `db_url` runs each test on SQLite and on PostgreSQL.

PostgreSQL: one throwaway database `gw_test_<hex>` per test session on the server of
TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test), emptied before each test and
dropped at the end.

PostgreSQL is expected (CI has it): a server that is unreachable or unusable makes the PostgreSQL params
*fail*, so a broken CI database can never pass as a green run of SQLite alone. Set TEST_POSTGRES=off
(also `0`, `no`, `false`) where no PostgreSQL is available, e.g. a laptop: they are skipped then.

`postgres_server` starts a private PostgreSQL the test owns (Debian's `initdb` and `pg_ctl`, found under
/usr/lib/postgresql/*/bin or in PG_BIN; run as the `postgres` user when the tests run as root) in a tmp
dir, on a free port of 127.0.0.1, for tests that stop and restart the server; it is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.cli.devservices import RedisProcess
from metering.db import create_engine
from metering.redis_store import RedisUsageStore

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
POSTGRES_ENV = "TEST_POSTGRES"


def postgres_expected() -> bool:
    """False only when TEST_POSTGRES says there is no PostgreSQL here."""
    return os.environ.get(POSTGRES_ENV, "").strip().lower() not in ("off", "0", "no", "false")


def _unavailable(message: str) -> None:
    """Fail (PostgreSQL is expected) or skip (TEST_POSTGRES=off)."""
    if postgres_expected():
        pytest.fail(f"{message} (set {POSTGRES_ENV}=off where no PostgreSQL is expected)", pytrace=False)
    pytest.skip(message)


def _asyncpg_dsn(url: str, database: str | None = None) -> str:
    """A plain postgresql:// DSN for asyncpg (which rejects SQLAlchemy's +driver suffix)."""
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


async def _execute(dsn: str, *statements: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """SQLAlchemy URL of a fresh database for this session; fails if PostgreSQL is not reachable
    (skips instead with TEST_POSTGRES=off)."""
    server = os.environ.get("TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    name = f"gw_test_{secrets.token_hex(6)}"
    admin_dsn = _asyncpg_dsn(server)
    try:
        # Sync fixture, no loop is running here: asyncio.run is safe.
        asyncio.run(_execute(admin_dsn, f'CREATE DATABASE "{name}"'))
    except (OSError, TimeoutError, ImportError) as exc:
        _unavailable(f"PostgreSQL not reachable at {make_url(server)!r} (set TEST_POSTGRES_URL): {exc!r}")
    except Exception as exc:  # asyncpg's own errors: auth failure, missing database "test", ...
        _unavailable(f"PostgreSQL at {make_url(server)!r} unusable (set TEST_POSTGRES_URL): {exc!r}")
    url = make_url(server).set(drivername="postgresql+asyncpg", database=name)
    yield url.render_as_string(hide_password=False)
    # FORCE (PostgreSQL 13+) drops it even if a leaked connection is still open.
    asyncio.run(_execute(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database, once per backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/gw.db"
    url: str = request.getfixturevalue("postgres_database")
    # One database per session, so each test starts from an empty schema instead.
    asyncio.run(_execute(_asyncpg_dsn(url), "DROP SCHEMA public CASCADE", "CREATE SCHEMA public"))
    return url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the empty database of `db_url`."""
    engine = create_engine(db_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def migrated_engine(engine: AsyncEngine) -> AsyncEngine:
    """`engine`, with the schema upgraded to head."""
    from metering.migrate import upgrade_async

    await upgrade_async(engine)
    return engine


# --------------------------------------------------------------------------- a private PostgreSQL server


def _pg_bin() -> Path | None:
    """The bin folder of Debian's PostgreSQL packages (newest version), or PG_BIN."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """A PostgreSQL cluster in a tmp dir, listening on 127.0.0.1 only; stop() and start() restart it."""

    def __init__(self, bin_dir: Path) -> None:
        self._bin = bin_dir
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        # initdb refuses to run as root: then the cluster belongs to the `postgres` user.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._as, str(self._bin / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> None:
        # The socket dir is the tmp dir, never /var/run/postgresql; fsync off: a test cluster.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Fast shutdown by the postmaster's PID (SIGINT): sessions are ended, as in a restart or failover."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL of this test's own (the test may stop and start it); removed afterwards."""
    bin_dir = _pg_bin()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        _unavailable("no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or PG_BIN")
    assert bin_dir is not None
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.close()


# The Redis store tests' client (an empty database) and store: `redis_server` is the suite's own redis-server.
@pytest.fixture
async def client(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_server.url)
    await redis.flushdb()
    yield redis
    await redis.aclose()


@pytest.fixture
async def store(client: Redis) -> AsyncIterator[RedisUsageStore]:
    store = RedisUsageStore(client, timeout=0.5)
    yield store
    await store.aclose()
