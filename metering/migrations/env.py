"""Alembic environment: runs revisions against the gateway's async engine.

Two ways in:
- metering.migrate hands over an open sync connection in `config.attributes["connection"]`
  (from `AsyncConnection.run_sync`), so migrations run inside the caller's event loop;
- otherwise (e.g. the `alembic` CLI) an engine is built from `config.attributes["url"]` or the
  `sqlalchemy.url` main option and driven with asyncio.run.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from metering.db import create_engine
from metering.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set config.attributes['url'] or sqlalchemy.url")
    return str(url)


def _configure(**kwargs: object) -> None:
    # Batch mode: SQLite cannot ALTER most things, Alembic then copies the table instead.
    context.configure(target_metadata=target_metadata, render_as_batch=True, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    """`alembic upgrade --sql`: print the DDL instead of executing it."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run_with_connection(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    # Our own create_engine, so SQLite gets its pragmas (foreign keys) during migrations too.
    engine = create_engine(_url())
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run_with_connection)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with_connection(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
