"""SQL store fixtures: `db_url` runs each test on SQLite and on PostgreSQL.

PostgreSQL: one throwaway database `gw_test_<hex>` per test session on the server of
TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test), emptied before each test and
dropped at the end. If the server is unreachable the PostgreSQL params are skipped, not failed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from metering.db import create_engine

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


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
    """SQLAlchemy URL of a fresh database for this session; skips if PostgreSQL is not reachable."""
    server = os.environ.get("TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    name = f"gw_test_{secrets.token_hex(6)}"
    admin_dsn = _asyncpg_dsn(server)
    try:
        # Sync fixture, no loop is running here: asyncio.run is safe.
        asyncio.run(_execute(admin_dsn, f'CREATE DATABASE "{name}"'))
    except (OSError, TimeoutError, ImportError) as exc:
        pytest.skip(f"PostgreSQL not reachable at {make_url(server)!r} (set TEST_POSTGRES_URL): {exc!r}")
    except Exception as exc:  # asyncpg's own errors: auth failure, missing database "test", ...
        pytest.skip(f"PostgreSQL at {make_url(server)!r} unusable (set TEST_POSTGRES_URL): {exc!r}")
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
