"""Schema migrations of the SQL store, without an alembic.ini.

    upgrade(url)                  # plain sync code: `cosmos-gateway db upgrade`
    await upgrade_async(url)      # inside a running event loop: start-up, tests
    current_revision(url)         # "0004", or None for an empty database

The Alembic configuration is built in code, pointing at the migrations shipped inside this package,
so an installed gateway can migrate without any file next to it.

Errors an operator acts on, each with a one-line message that says what to do (`cosmos-gateway` prints it):

    MigrationError
    ├── DatabaseUnreachable   no connection could be opened (address, credentials, a SQLite folder)
    ├── SchemaNewerThanCode   a newer cosmos-gateway migrated the database past every revision we know
    └── SchemaOlderThanCode   PostgreSQL below head at start-up: `cosmos-gateway db upgrade` first
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from metering.db import create_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Alembic's default; migrations/env.py does not choose another.
VERSION_TABLE = "alembic_version"

_T = TypeVar("_T")


class MigrationError(RuntimeError):
    """The database cannot be migrated or used as it is; str() is one line for the operator."""


class DatabaseUnreachable(MigrationError):
    """No connection to the database could be opened."""


class SchemaNewerThanCode(MigrationError):
    """The database is at a revision this code does not ship: a newer version migrated it."""


class SchemaOlderThanCode(MigrationError):
    """The database is below head where this process may not migrate it (PostgreSQL at start-up)."""


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
    """Run the sync `action(connection)` in one transaction on `url`'s engine (or the given engine).

    Failing to connect is DatabaseUnreachable; errors once connected (a failing revision) are left as they are.
    """
    engine = _connectable(url)
    try:
        connection = engine.connect()
        try:
            await connection.start()
        except Exception as exc:
            # Drivers fail to connect with their own classes: OSError, asyncpg's PostgresError subclasses unwrapped,
            # sqlite3's wrapped in SQLAlchemy's OperationalError. To the operator they all mean the same.
            raise DatabaseUnreachable(f"cannot reach the database {_shown(engine.url)}: {_one_line(exc)}") from exc
        try:
            async with connection.begin():
                return await connection.run_sync(action)
        finally:
            await connection.close()
    finally:
        if isinstance(url, str):
            await engine.dispose()


def _connectable(url: str | AsyncEngine) -> AsyncEngine:
    if not isinstance(url, str):
        return url
    try:
        return create_engine(url)
    except OSError as exc:  # a SQLite file whose folder cannot be created
        raise DatabaseUnreachable(f"cannot reach the database {_shown(url)}: {_one_line(exc)}") from exc


def _shown(url: str | URL) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _one_line(exc: BaseException) -> str:
    # SQLAlchemy's wrapper adds a second line ("Background on this error at ..."): the driver's own words suffice.
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return " ".join(str(cause).split()) or type(cause).__name__


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def _database_revisions(connection: Connection) -> tuple[str, ...]:
    """The revisions in the version table, () before the first migration.

    Read with a plain SELECT rather than Alembic's MigrationContext, whose set-up logs two INFO lines: a refusal
    should be the one line that explains it.
    """
    if not inspect(connection).has_table(VERSION_TABLE):
        return ()
    return tuple(connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())


def check_not_newer(connection: Connection, script: ScriptDirectory | None = None) -> None:
    """Raise SchemaNewerThanCode when the database names a revision this code does not ship.

    Alembic would fail later with "Can't locate revision", which says neither what happened nor what to do:
    a newer cosmos-gateway migrated the database, and this older one must not run on that schema.
    """
    script = script or _script()
    known = {revision.revision for revision in script.walk_revisions()}
    unknown = [revision for revision in _database_revisions(connection) if revision not in known]
    if unknown:
        raise SchemaNewerThanCode(
            f"the database schema is at revision {', '.join(unknown)}, newer than this cosmos-gateway "
            f"(head {script.get_current_head()}): run the newer cosmos-gateway that migrated it, "
            "or restore the database backup taken before it did")


async def upgrade_async(url: str | AsyncEngine, revision: str = "head") -> None:
    """Migrate the database to `revision` from inside a running event loop.

    Alembic runs on the sync side of an async connection (`run_sync`), so no second loop or thread.
    Given an engine instead of a URL, it is used and left open (e.g. a sqlite :memory: database).
    """

    def run(connection: Connection) -> None:
        check_not_newer(connection)
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
        revisions = _database_revisions(connection)
        return revisions[0] if revisions else None

    result: str | None = await _with_connection(url, read)
    return result


def current_revision(url: str) -> str | None:
    """Sync variant of current_revision_async, for code with no event loop running in this thread."""
    return _run_sync(current_revision_async(url))


def head_revision() -> str | None:
    """The newest revision shipped with this package."""
    return _script().get_current_head()


async def prepare_schema(engine: AsyncEngine) -> None:
    """At start-up: SQLite (one host, the development default) is migrated; PostgreSQL must be at head.

    Several hosts starting at once must not race to migrate a shared database, so for PostgreSQL
    `cosmos-gateway db upgrade` is a deploy step and a process refuses to start on an older schema.
    Neither starts on a schema newer than this code (SchemaNewerThanCode).
    """
    if engine.url.get_backend_name() == "sqlite":
        await upgrade_async(engine)
        return

    def check(connection: Connection) -> None:
        script = _script()
        check_not_newer(connection, script)
        current, head = _database_revisions(connection), script.get_current_head()
        if current != (head,):
            at = f"at revision {', '.join(current)}" if current else "empty (never migrated)"
            raise SchemaOlderThanCode(f"the database schema is {at}, older than this cosmos-gateway (head {head}): "
                                      "run `cosmos-gateway db upgrade` first")

    await _with_connection(engine, check)
