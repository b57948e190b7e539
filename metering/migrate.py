"""Schema migrations of the SQL store, without an alembic.ini.

    upgrade(url)                  # plain sync code: `cosmos-gateway db upgrade`
    await upgrade_async(url)      # inside a running event loop: start-up, tests
    current_revision(url)         # "0004", or None for an empty database

The Alembic configuration is built in code, pointing at the migrations shipped inside this package,
so an installed gateway can migrate without any file next to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from metering.db import create_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_T = TypeVar("_T")


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config for our migrations; the URL travels in `attributes`, not in the ini options,
    because ConfigParser would try to interpolate the `%` of URL-encoded passwords."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Silences Alembic's "no path_separator" deprecation warning; we have a single versions directory.
    config.set_main_option("path_separator", "os")
    if url is not None:
        config.attributes["url"] = url
    return config


def _run_sync(coroutine: Coroutine[Any, Any, _T]) -> _T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    coroutine.close()  # not awaited: avoid the "coroutine was never awaited" warning
    raise RuntimeError("called from a running event loop; use the *_async variant instead")


async def _with_connection(url: str | AsyncEngine, action: Any) -> Any:
    """Run the sync `action(connection)` in one transaction on `url`'s engine (or the given engine)."""
    engine = create_engine(url) if isinstance(url, str) else url
    try:
        async with engine.begin() as connection:
            return await connection.run_sync(action)
    finally:
        if isinstance(url, str):
            await engine.dispose()


async def upgrade_async(url: str | AsyncEngine, revision: str = "head") -> None:
    """Migrate the database to `revision` from inside a running event loop.

    Alembic runs on the sync side of an async connection (`run_sync`), so no second loop or thread.
    Given an engine instead of a URL, it is used and left open (e.g. a sqlite :memory: database).
    """

    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    await _with_connection(url, run)


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database to `revision`; for sync code with no event loop running in this thread."""
    _run_sync(upgrade_async(url, revision))


async def current_revision_async(url: str | AsyncEngine) -> str | None:
    """The revision the database is at, or None if it was never migrated."""

    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    result: str | None = await _with_connection(url, read)
    return result


def current_revision(url: str) -> str | None:
    """Sync variant of current_revision_async, for code with no event loop running in this thread."""
    return _run_sync(current_revision_async(url))


def head_revision() -> str | None:
    """The newest revision shipped with this package."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def prepare_schema(engine: AsyncEngine) -> None:
    """At start-up: SQLite (one host, the development default) is migrated; PostgreSQL must be at head.

    Several hosts starting at once must not race to migrate a shared database, so for PostgreSQL
    `cosmos-gateway db upgrade` is a deploy step and a process refuses to start on an older schema.
    """
    if engine.url.get_backend_name() == "sqlite":
        await upgrade_async(engine)
        return
    current, head = await current_revision_async(engine), head_revision()
    if current != head:
        raise RuntimeError(f"the database schema is at {current or 'nothing'}, not {head}: "
                           "run `cosmos-gateway db upgrade` first")
