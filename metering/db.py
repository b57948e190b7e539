"""Async SQLAlchemy engine and session factory for the gateway's SQL store.

One URL selects the backend: `sqlite+aiosqlite:///var/gateway.db` for a single host,
`postgresql+asyncpg://user@host/db` when several gateway hosts share the store.

    engine = create_engine(url)
    sessions = session_factory(engine)
    await ping(engine)          # readiness check; raises if the database is unreachable
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from metering.spool_files import make_private_folder

# SQLite settings applied to every new connection. They are per-connection, not per-file
# (except journal_mode, which sticks to the file), so a pool refill must set them again.
_SQLITE_PRAGMAS = (
    # WAL lets the admin API read while a worker writes, instead of "database is locked".
    "PRAGMA journal_mode=WAL",
    # Several workers share one file: wait for a writer rather than failing at once.
    "PRAGMA busy_timeout=5000",
    # SQLite ignores FOREIGN KEY clauses (e.g. ON DELETE CASCADE of overrides) unless asked.
    "PRAGMA foreign_keys=ON",
)


def _is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for in-memory and `file:` URI databases."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _set_sqlite_pragmas(dbapi_connection: Any, _connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def create_engine(url: str) -> AsyncEngine:
    """An async engine for `url`; a missing SQLite file is created 0600, and missing folders 0700."""
    parsed = make_url(url)
    if _is_sqlite(parsed):
        path = _sqlite_file(parsed)
        if path is not None:
            # A fresh checkout has no var/ directory; sqlite would fail with "unable to open database file".
            make_private_folder(path.parent)
            # Created here, 0600, before SQLite creates it 0644; its -wal and -shm files take its mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        engine = create_async_engine(parsed)
        # The event hangs on the sync engine: that is where DBAPI connections are created.
        event.listen(engine.sync_engine, "connect", _set_sqlite_pragmas)
        return engine
    # Server connections die behind our back (failover, idle timeouts in proxies): check before use.
    return create_async_engine(parsed, pool_pre_ping=True)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (no lazy reload in async code)."""
    return async_sessionmaker(engine, expire_on_commit=False)


# A readiness probe must answer even when the database host is black-holed.
PING_TIMEOUT_SECONDS = 5.0


async def ping(engine: AsyncEngine) -> None:
    """Run `SELECT 1`; raises if the database is not usable.

    What is raised depends on where it fails: SQLAlchemyError for query errors, OSError when the host
    refuses, the driver's own error for failed connects (asyncpg does not get wrapped), TimeoutError.
    Gives up with TimeoutError after PING_TIMEOUT_SECONDS.
    """
    async with asyncio.timeout(PING_TIMEOUT_SECONDS), engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
