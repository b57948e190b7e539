"""What the SQL drivers' errors mean, read in one place, and the retry of a transaction that met them.

    store_unavailable(exc)   the store is down or restarting: answer 503 and let the caller try later
    database_locked(exc)     SQLite's "database is locked": another writer held the file; worth another try
    retry_transaction(...)   run a transaction again after a lost race or a locked SQLite file (bounded)

Every package may use these (the admin API, /_gateway/usage, the Stripe webhooks); they know nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

log = logging.getLogger("cosmos_gateway.sql")

# SQLSTATE classes of a server that is away, not of a query that is wrong: 08 connection exception,
# 53 insufficient resources, 57 operator intervention (57P01 admin shutdown, 57P03 cannot connect now),
# 58 system error; and 40001/40P01, a serialization failure or deadlock that a retry resolves.
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57", "58")
_TRANSIENT_SQLSTATES = ("40001", "40P01")
# Delays before trying again after SQLite's "database is locked" (its busy_timeout already waited).
LOCKED_RETRY_DELAYS = (0.05, 0.2, 0.5)

_T = TypeVar("_T")


def store_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the SQL store is unreachable or restarting (answer 503, try later), not a bug.

    The one place that reads the drivers' errors: OSError and TimeoutError (connecting), SQLAlchemy's
    OperationalError and InterfaceError (SQLite, a closed connection), and PostgreSQL's errors during a
    restart, which SQLAlchemy wraps as a plain DBAPIError (asyncpg's AdminShutdownError, 57P01) or which
    asyncpg raises unwrapped while connecting (CannotConnectNowError, 57P03; ConnectionDoesNotExistError).
    """
    if isinstance(exc, OSError | TimeoutError | OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith(_UNAVAILABLE_SQLSTATE_CLASSES) or sqlstate in _TRANSIENT_SQLSTATES
    # asyncpg's client-side errors (a connection closed under a query) carry no SQLSTATE.
    module = type(exc).__module__
    return module.startswith("asyncpg") and type(exc).__name__ in (
        "ConnectionDoesNotExistError", "InterfaceError", "InternalClientError", "ConnectionFailureError")


def database_locked(exc: BaseException) -> bool:
    """SQLite's "database is locked": another writer held the file past busy_timeout; worth another try."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig)


async def retry_transaction(attempt: Callable[[], Awaitable[_T]], *, conflicts: tuple[type[BaseException], ...],
                            max_rounds: int, label: str,
                            sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> _T:
    """Run the transaction `attempt` again when it lost a race or met a locked SQLite file (bounded).

    `conflicts` are the errors of a lost race (a concurrent insert of the same key, a compare-and-set that
    found the row changed): once again, the other transaction's row is now visible. After `max_rounds`
    such rounds, or when the locked file outlasts LOCKED_RETRY_DELAYS, it gives up with an
    OperationalError, which `store_unavailable` reads as "try later".
    """
    locked_delays = iter(LOCKED_RETRY_DELAYS)
    rounds = 0
    while True:
        rounds += 1
        try:
            return await attempt()
        except conflicts:
            if rounds >= max_rounds:
                raise OperationalError(label, None, Exception("lost the race too often")) from None
        except OperationalError as exc:
            delay = next(locked_delays, None) if database_locked(exc) else None
            if delay is None:
                raise
            log.info("%s: the SQLite file is locked; trying again in %.2f s", label, delay)
            await sleep(delay)
